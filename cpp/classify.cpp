// classify: top-5 classes of PPM/PGM images with an AOTInductor package from export.py.
//
//   python export.py runs/x/best.pt --format aoti          # writes best.pt2 and best.pt2.meta
//   build/cpp/classify runs/x/best.pt2 cat.ppm dog.ppm [--meta FILE] [--device cpu|cuda] [--dump-input FILE]
//
// --device must be the device in the .meta file, the one the package was compiled for (the default).
//
// Prints one line per (image, rank):  <image>\t<rank>\t<class index>\t<class name>\t<probability>
// Each image is read as binary PPM (P6) or PGM (P5) into a uint8 tensor and preprocessed as
// data.py does, with the same ATen ops: antialiased bilinear resize of the uint8 image
// (at::_upsample_bilinear2d_aa, what torchvision's resize runs), then the channel conversion
// (gray -> RGB by repetition, RGB -> gray by PIL's fixed-point luminance), then
// (x / 255 - mean) / std in float32. So the network input is bit-identical to data.py's for the
// same pixels. Run as a batch of one per image. --dump-input FILE writes those network inputs
// (float32, little-endian, N x C x S x S in image order) for checking. No image library: convert
// other formats first, e.g. `python -c "from PIL import Image; Image.open('a.jpg').save('a.ppm')"`.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cctype>
#include <cstdint>
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

// A binary PNM file as a uint8 tensor C x H x W. 16-bit samples keep their high byte (as
// torchvision decodes 16-bit PNGs); other maxvals are rescaled to 0..255 with rounding.
at::Tensor read_pnm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open image " + path);
  const std::string magic = pnm_token(f);
  if (magic != "P6" && magic != "P5")
    throw std::runtime_error(path + ": not a binary PPM (P6) or PGM (P5) file");
  const int channels = magic == "P6" ? 3 : 1;
  int width = 0, height = 0, maxval = 0;
  try {
    width = std::stoi(pnm_token(f));
    height = std::stoi(pnm_token(f));
    maxval = std::stoi(pnm_token(f));  // the single whitespace after it was consumed
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": bad PNM header");
  }
  if (width <= 0 || height <= 0 || maxval <= 0 || maxval > 65535)
    throw std::runtime_error(path + ": bad PNM header");
  const size_t samples = (size_t)width * height * channels, bytes = maxval > 255 ? 2 : 1;
  std::vector<unsigned char> raw(samples * bytes);
  if (!f.read(reinterpret_cast<char*>(raw.data()), raw.size()))
    throw std::runtime_error(path + ": truncated image data");
  at::Tensor hwc = at::empty({height, width, channels}, at::kByte);
  uint8_t* p = hwc.data_ptr<uint8_t>();
  for (size_t i = 0; i < samples; ++i) {
    const unsigned v = bytes == 2 ? (raw[2 * i] << 8 | raw[2 * i + 1]) : raw[i];  // 16-bit PNM is big-endian
    p[i] = maxval == 255 ? v : maxval == 65535 ? v >> 8 : (v * 255 + maxval / 2) / maxval;
  }
  return hwc.permute({2, 0, 1}).contiguous();  // interleaved H x W x C -> planar C x H x W
}

// data._convert_channels: gray -> RGB repeats the plane; RGB -> gray is PIL's convert('L') in its
// fixed point, L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
at::Tensor convert_channels(const at::Tensor& img, int channels) {
  const int64_t c = img.size(0);
  if (c == channels) return img;
  if (c == 1 && channels == 3) return img.repeat({3, 1, 1});
  if (c == 3 && channels == 1) {
    const at::Tensor w = img.to(at::kInt);
    const at::Tensor lum = (w[0] * 19595 + w[1] * 38470 + w[2] * 7471 + 0x8000).bitwise_right_shift(16);
    return lum.to(at::kByte).unsqueeze(0);
  }
  throw std::runtime_error("cannot convert a " + std::to_string(c) + "-channel image to " +
                           std::to_string(channels) + " channels");
}

// The network input for one image, 1 x C x S x S float32, as data.py computes it: resize the uint8
// image with torch's antialiased bilinear kernel (F.interpolate(uint8, antialias=True), which
// torchvision's resize calls), convert channels, normalize.
at::Tensor preprocess(const std::string& path, const Meta& m) {
  at::Tensor x = read_pnm(path).unsqueeze(0);  // 1 x C x H x W uint8
  if (x.size(2) != m.image_size || x.size(3) != m.image_size)
    x = at::_upsample_bilinear2d_aa(x, {m.image_size, m.image_size}, /*align_corners=*/false);
  x = convert_channels(x[0], m.in_channels).unsqueeze(0);
  const at::Tensor mean = at::tensor(m.mean, at::kFloat).view({1, -1, 1, 1});
  const at::Tensor std = at::tensor(m.std, at::kFloat).view({1, -1, 1, 1});
  return x.to(at::kFloat).div_(255).sub_(mean).div_(std).contiguous();
}

// libtorch.so is torch's umbrella library: the package's compiled code needs it by name, and in
// CUDA builds loading it loads libtorch_cuda, which registers the CUDA kernels and the CUDA
// package runner. Nothing here references it by symbol, so a linker that drops unreferenced
// libraries (GNU ld with --as-needed, a common default) leaves it out of the binary; keeping it
// would take linker-specific flags. So it is loaded at run time, through the binary's RPATH.
void load_libtorch() {
#ifdef _WIN32
  if (!LoadLibraryA("torch.dll")) throw std::runtime_error("cannot load torch.dll");
#else
  if (!dlopen("libtorch.so", RTLD_NOW | RTLD_GLOBAL))
    throw std::runtime_error(std::string("cannot load libtorch.so: ") + dlerror());
#endif
}

int usage() {
  std::cerr << "usage: classify MODEL.pt2 IMAGE.ppm [IMAGE ...] [--meta FILE] [--device cpu|cuda] "
               "[--dump-input FILE]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, meta_path, device, dump_path;
  std::vector<std::string> images;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--meta" || a == "--device" || a == "--dump-input") {
      if (i + 1 >= argc) return usage();
      (a == "--meta" ? meta_path : a == "--device" ? device : dump_path) = argv[++i];
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
    // The package runs on the device it was compiled for (AOTInductor's loader cannot move it); an
    // input on the other side would be read through the wrong kind of pointer.
    if (!device.empty() && device != meta.device)
      throw std::runtime_error("--device " + device + ": " + model + " was compiled for " + meta.device +
                               " (" + meta_path + "); export it with --device " + device + " to run there");
    device = meta.device;
    load_libtorch();
    std::ofstream dump;
    if (!dump_path.empty()) {
      dump.open(dump_path, std::ios::binary | std::ios::trunc);
      if (!dump) throw std::runtime_error("cannot write " + dump_path);
    }
    torch::inductor::AOTIModelPackageLoader loader(model);
    const int k = std::min<int>(5, (int)meta.classes.size());
    for (const auto& path : images) {
      at::Tensor x = preprocess(path, meta);
      if (dump.is_open() && !dump.write(reinterpret_cast<const char*>(x.const_data_ptr<float>()), x.nbytes()))
        throw std::runtime_error("cannot write " + dump_path);
      x = x.to(at::Device(device));
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
