// classify: top-5 classes of PPM/PGM images with an AOTInductor package from export.py.
//
//   python export.py runs/x/best.pt --format aoti          # writes best.pt2 and best.pt2.meta
//   build/cpp/classify runs/x/best.pt2 cat.ppm dog.ppm [--meta FILE] [--device cpu|cuda]
//
// Prints one line per (image, rank):  <image>\t<rank>\t<class index>\t<class name>\t<probability>
// Each image is read as binary PPM (P6) or PGM (P5), converted to the model's channel count,
// resized with antialiased bilinear interpolation (torchvision's / PIL's filter, so it matches
// F.interpolate(mode="bilinear", antialias=True)), normalized with the training mean/std, and
// run as a batch of one. No image library: convert other formats first, e.g.
// `convert photo.jpg photo.ppm` (ImageMagick) or `python -c "from PIL import Image; ..."`.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Meta {
  int image_size = 0;
  int in_channels = 0;
  std::vector<float> mean, std;
  std::vector<std::string> classes;
  std::string device = "cpu";
};

struct Image {  // planar float image in [0, 1]: C x H x W
  int channels = 0, height = 0, width = 0;
  std::vector<float> data;
};

// Sidecar written by export.py: one `key value` per line; `class NAME` lines in class order.
Meta read_meta(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open meta file " + path);
  Meta m;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty() || line[0] == '#') continue;
    const auto space = line.find(' ');
    const std::string key = line.substr(0, space);
    const std::string value = space == std::string::npos ? "" : line.substr(space + 1);
    std::istringstream in(value);
    float v;
    if (key == "image_size") in >> m.image_size;
    else if (key == "in_channels") in >> m.in_channels;
    else if (key == "mean") while (in >> v) m.mean.push_back(v);
    else if (key == "std") while (in >> v) m.std.push_back(v);
    else if (key == "class") m.classes.push_back(value);
    else if (key == "device") m.device = value;
  }
  if (m.image_size <= 0 || m.in_channels <= 0 || m.classes.empty() ||
      (int)m.mean.size() != m.in_channels || (int)m.std.size() != m.in_channels)
    throw std::runtime_error(path + " is not an export.py meta file (needs image_size, in_channels, "
                             "mean and std per channel, class lines)");
  return m;
}

// Next header token of a PNM file, skipping whitespace and # comments.
std::string pnm_token(std::istream& f) {
  std::string tok;
  int c;
  while ((c = f.get()) != EOF) {
    if (c == '#') {
      while ((c = f.get()) != EOF && c != '\n') {}
    } else if (std::isspace(c)) {
      if (!tok.empty()) break;
    } else {
      tok += static_cast<char>(c);
    }
  }
  return tok;
}

Image read_pnm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open image " + path);
  const std::string magic = pnm_token(f);
  if (magic != "P6" && magic != "P5")
    throw std::runtime_error(path + ": not a binary PPM (P6) or PGM (P5) file");
  Image img;
  img.channels = magic == "P6" ? 3 : 1;
  int maxval = 0;
  try {
    img.width = std::stoi(pnm_token(f));
    img.height = std::stoi(pnm_token(f));
    maxval = std::stoi(pnm_token(f));  // the single whitespace after it was consumed
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": bad PNM header");
  }
  if (img.width <= 0 || img.height <= 0 || maxval <= 0 || maxval > 65535)
    throw std::runtime_error(path + ": bad PNM header");
  const size_t pixels = (size_t)img.width * img.height, bytes = maxval > 255 ? 2 : 1;
  std::vector<unsigned char> raw(pixels * img.channels * bytes);
  if (!f.read(reinterpret_cast<char*>(raw.data()), raw.size()))
    throw std::runtime_error(path + ": truncated image data");
  img.data.resize(raw.size() / bytes);
  for (size_t i = 0; i < pixels; ++i)  // interleaved HWC -> planar CHW
    for (int c = 0; c < img.channels; ++c) {
      const size_t j = (i * img.channels + c) * bytes;
      const int v = bytes == 2 ? (raw[j] << 8 | raw[j + 1]) : raw[j];  // 16-bit PNM is big-endian
      img.data[c * pixels + i] = (float)v / maxval;
    }
  return img;
}

// RGB -> gray with PIL's luminance weights (as data.py); gray -> RGB repeats the plane.
Image convert_channels(const Image& img, int channels) {
  if (img.channels == channels) return img;
  const size_t pixels = (size_t)img.width * img.height;
  Image out{channels, img.height, img.width, std::vector<float>(pixels * channels)};
  if (channels == 1 && img.channels == 3) {
    for (size_t i = 0; i < pixels; ++i)
      out.data[i] = 0.299f * img.data[i] + 0.587f * img.data[pixels + i] + 0.114f * img.data[2 * pixels + i];
  } else if (img.channels == 1) {
    for (int c = 0; c < channels; ++c) std::copy(img.data.begin(), img.data.end(), out.data.begin() + c * pixels);
  } else {
    throw std::runtime_error("cannot convert a " + std::to_string(img.channels) + "-channel image to " +
                             std::to_string(channels) + " channels");
  }
  return out;
}

// Weights of a 1-D antialiased bilinear (triangle) resampling from `in` to `out` samples, as in
// PIL / ATen's _upsample_bilinear2d_aa: the triangle is widened by the scale when shrinking.
struct Taps { std::vector<int> start, count; std::vector<std::vector<float>> w; };
Taps triangle_taps(int in, int out) {
  const double scale = (double)in / out, support = scale > 1.0 ? scale : 1.0;
  Taps t;
  for (int i = 0; i < out; ++i) {
    const double center = (i + 0.5) * scale;
    const int lo = std::max(0, (int)(center - support + 0.5));
    const int hi = std::min(in, (int)(center + support + 0.5));
    std::vector<float> w;
    double total = 0.0;
    for (int j = lo; j < hi; ++j) {
      const double x = std::abs((j - center + 0.5) / support);
      w.push_back((float)std::max(0.0, 1.0 - x));
      total += w.back();
    }
    for (auto& v : w) v = total > 0 ? (float)(v / total) : 0.f;
    t.start.push_back(lo);
    t.count.push_back(hi - lo);
    t.w.push_back(w);
  }
  return t;
}

Image resize(const Image& img, int size) {
  if (img.height == size && img.width == size) return img;
  const Taps tx = triangle_taps(img.width, size), ty = triangle_taps(img.height, size);
  Image tmp{img.channels, img.height, size, std::vector<float>((size_t)img.channels * img.height * size)};
  Image out{img.channels, size, size, std::vector<float>((size_t)img.channels * size * size)};
  for (int c = 0; c < img.channels; ++c) {
    const float* src = img.data.data() + (size_t)c * img.height * img.width;
    float* mid = tmp.data.data() + (size_t)c * img.height * size;
    for (int y = 0; y < img.height; ++y)  // horizontal pass
      for (int x = 0; x < size; ++x) {
        float acc = 0.f;
        for (int k = 0; k < tx.count[x]; ++k) acc += tx.w[x][k] * src[(size_t)y * img.width + tx.start[x] + k];
        mid[(size_t)y * size + x] = acc;
      }
    float* dst = out.data.data() + (size_t)c * size * size;
    for (int y = 0; y < size; ++y)  // vertical pass
      for (int x = 0; x < size; ++x) {
        float acc = 0.f;
        for (int k = 0; k < ty.count[y]; ++k) acc += ty.w[y][k] * mid[(size_t)(ty.start[y] + k) * size + x];
        dst[(size_t)y * size + x] = acc;
      }
  }
  return out;
}

Image to_8bit(Image img) {
  for (auto& v : img.data) v = std::round(std::clamp(v, 0.f, 1.f) * 255.f) / 255.f;
  return img;
}

at::Tensor preprocess(const std::string& path, const Meta& m) {
  // The order and the 8-bit rounding after each step follow data.py, which works on uint8 images.
  const Image img = to_8bit(convert_channels(to_8bit(resize(read_pnm(path), m.image_size)), m.in_channels));
  at::Tensor x = at::empty({1, m.in_channels, m.image_size, m.image_size}, at::kFloat);  // 1 x C x S x S
  float* p = x.data_ptr<float>();
  const size_t plane = (size_t)m.image_size * m.image_size;
  for (int c = 0; c < m.in_channels; ++c)
    for (size_t i = 0; i < plane; ++i) p[c * plane + i] = (img.data[c * plane + i] - m.mean[c]) / m.std[c];
  return x;
}

int usage() {
  std::cerr << "usage: classify MODEL.pt2 IMAGE.ppm [IMAGE ...] [--meta FILE] [--device cpu|cuda]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, meta_path, device;
  std::vector<std::string> images;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--meta" || a == "--device") {
      if (i + 1 >= argc) return usage();
      (a == "--meta" ? meta_path : device) = argv[++i];
    } else if (a == "-h" || a == "--help" || (a.size() > 1 && a[0] == '-')) {
      return usage();
    } else if (model.empty()) {
      model = a;
    } else {
      images.push_back(a);
    }
  }
  if (model.empty() || images.empty() || (!device.empty() && device != "cpu" && device != "cuda")) return usage();
  if (meta_path.empty()) meta_path = model + ".meta";
  try {
    const Meta meta = read_meta(meta_path);
    if (device.empty()) device = meta.device;  // the package runs on the device it was compiled for
    torch::inductor::AOTIModelPackageLoader loader(model);
    const int k = std::min<int>(5, (int)meta.classes.size());
    for (const auto& path : images) {
      at::Tensor x = preprocess(path, meta).to(at::Device(device));
      at::Tensor logits = loader.run({x})[0].to(at::kCPU).to(at::kFloat);  // 1 x num_classes
      if (logits.size(-1) != (int64_t)meta.classes.size())
        throw std::runtime_error("model gives " + std::to_string(logits.size(-1)) + " logits but the meta file " +
                                 "names " + std::to_string(meta.classes.size()) + " classes");
      auto [prob, index] = at::softmax(logits[0], 0).topk(k);
      for (int r = 0; r < k; ++r) {
        const int64_t c = index[r].item<int64_t>();
        std::printf("%s\t%d\t%lld\t%s\t%.6f\n", path.c_str(), r + 1, (long long)c, meta.classes[c].c_str(),
                    prob[r].item<float>());
      }
    }
  } catch (const std::exception& e) {
    // c10::Error carries a backtrace after the first line; keep the message to one line.
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));
    std::cerr << "error: " << msg << "\n";
    return 1;
  }
  return 0;
}
