#pragma once
// safetensors reader (mmap, zero-copy on the host) and writer (atomic: temporary file,
// then rename). The reader validates the whole header before anything is read: a file
// from the internet either opens cleanly or throws a ttt::Error naming the file, the
// tensor and the problem.
//
// Format: u64 little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data section; offsets are relative to its start.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/tensor.hpp"

namespace ttt::io {

struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  size_t begin = 0, end = 0;  // byte range inside the data section
};

namespace detail {

// Read-only mapping of a whole file, unmapped when the last tensor viewing it dies.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      fail(path, ": cannot stat (", std::strerror(e), ")");
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(path, ": not a regular file");
    }
    size_ = size_t(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        fail(path, ": cannot map (", std::strerror(e), ")");
      }
      data_ = static_cast<const uint8_t*>(p);
      mapped_ = true;
    }
    ::close(fd);
  }
  // An in-memory "file" (fuzzing, network buffers): the bytes are copied.
  MappedFile(const uint8_t* data, size_t size, std::string name) : path_(std::move(name)), size_(size) {
    owned_.assign(data, data + size);
    data_ = owned_.data();
  }
  ~MappedFile() {
    if (mapped_) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::vector<uint8_t> owned_;
  bool mapped_ = false;
};

inline uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Converts n elements of dtype `from` at src into T (floating conversions through float;
// integers exactly).
template <class T>
void convert_elements(T* dst, const uint8_t* src, size_t n, DType from) {
  auto each = [&](auto tag) {
    using S = decltype(tag);
    for (size_t i = 0; i < n; ++i) {
      S v;
      std::memcpy(&v, src + i * sizeof(S), sizeof(S));
      if constexpr (is_floating_v<T> && !std::is_same_v<T, double>) {
        if constexpr (is_floating_v<S>) {
          if constexpr (std::is_same_v<S, double>) dst[i] = from_f32<T>(float(v));
          else dst[i] = from_f32<T>(to_f32(v));
        } else {
          dst[i] = from_f32<T>(float(v));
        }
      } else if constexpr (std::is_same_v<T, double>) {
        if constexpr (std::is_same_v<S, double>) dst[i] = v;
        else if constexpr (is_floating_v<S>) dst[i] = double(to_f32(v));
        else dst[i] = double(v);
      } else {
        if constexpr (is_floating_v<S>) {
          if constexpr (std::is_same_v<S, double>) dst[i] = T(v);
          else dst[i] = T(to_f32(v));
        } else {
          dst[i] = T(v);
        }
      }
    }
  };
  switch (from) {
    case DType::f32: each(float{}); break;
    case DType::f64: each(double{}); break;
    case DType::bf16: each(bf16{}); break;
    case DType::f16: each(f16{}); break;
    case DType::i32: each(int32_t{}); break;
    case DType::i64: each(int64_t{}); break;
    case DType::u8: case DType::boolean: each(uint8_t{}); break;
  }
}

}  // namespace detail

class SafeTensors {
 public:
  // Maps and validates `path`. Throws ttt::Error on any inconsistency.
  static SafeTensors open(const std::string& path) {
    SafeTensors st;
    st.file_ = std::make_shared<detail::MappedFile>(path);
    st.parse();
    return st;
  }

  // The same from bytes in memory; `name` stands for the path in messages.
  static SafeTensors from_bytes(const uint8_t* data, size_t size, const std::string& name) {
    SafeTensors st;
    st.file_ = std::make_shared<detail::MappedFile>(data, size, name);
    st.parse();
    return st;
  }

  const std::string& path() const { return file_->path(); }
  const std::vector<TensorInfo>& tensors() const { return infos_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end()) fail(path(), ": no tensor named '", name, "'");
    return infos_[it->second];
  }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& i : infos_) n.push_back(i.name);
    return n;
  }

  // Zero-copy view when the stored dtype is T and the data is aligned; otherwise a
  // converted copy. Floating dtypes convert among themselves, integer dtypes among
  // themselves; anything else is an error naming the tensor.
  template <class T>
  Tensor<T, Cpu> load(const std::string& name) const {
    const TensorInfo& ti = info(name);
    const uint8_t* p = data_ + ti.begin;
    const bool want_float = is_floating_v<T>;
    const bool have_float = ti.dtype == DType::f32 || ti.dtype == DType::f64 || ti.dtype == DType::bf16 ||
                            ti.dtype == DType::f16;
    if (want_float != have_float)
      fail(path(), ": tensor '", name, "' has dtype ", dtype_name(ti.dtype), ", expected a ",
           want_float ? "floating" : "integer", " type (", dtype_name(dtype_v<T>), ")");
    const size_t n = size_t(ti.shape.numel());
    if (ti.dtype == dtype_v<T> ||
        (std::is_same_v<T, uint8_t> && ti.dtype == DType::boolean)) {
      if (reinterpret_cast<uintptr_t>(p) % alignof(T) == 0)
        return Tensor<T, Cpu>::borrow(reinterpret_cast<T*>(const_cast<uint8_t*>(p)), ti.shape, file_);
      auto t = Tensor<T, Cpu>::empty(ti.shape);
      if (n) std::memcpy(t.data(), p, n * sizeof(T));
      return t;
    }
    auto t = Tensor<T, Cpu>::empty(ti.shape);
    detail::convert_elements(t.data(), p, n, ti.dtype);
    return t;
  }

  // Stream counters (offsets, positions, frame counters of a saved session) as int64, each in
  // [0, kMaxCounter]: a session advances them by one per frame, so a stored value near the
  // int64 limit would overflow; 2^62 frames is far beyond any stream (12.5 frames/s).
  static constexpr int64_t kMaxCounter = int64_t(1) << 62;
  std::vector<int64_t> load_counters(const std::string& name) const {
    const Tensor<int64_t, Cpu> t = load<int64_t>(name);  // dense: a view of the file or a converted copy
    std::vector<int64_t> v(t.data(), t.data() + t.numel());
    for (int64_t c : v)
      if (c < 0 || c > kMaxCounter)
        fail(path(), ": tensor '", name, "' holds ", c, ", a counter must be in [0, 2^62]");
    return v;
  }

 private:
  void parse() {
    const std::string& f = file_->path();
    const size_t size = file_->size();
    if (size < 8) fail(f, ": truncated safetensors file (", size, " bytes, the header length alone needs 8)");
    const uint64_t n = detail::read_le64(file_->data());
    if (n > size - 8)
      fail(f, ": header length ", n, " runs past the end of the file (", size, " bytes)");
    if (n > (uint64_t(100) << 20)) fail(f, ": header length ", n, " exceeds the 100 MB limit");
    if (n < 2) fail(f, ": header of ", n, " bytes cannot hold a JSON object");
    const char* h = reinterpret_cast<const char*>(file_->data() + 8);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(h, h + n);
    } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1E6384
      fail(f, ": malformed JSON header (", e.what(), ")");
    }
    if (!j.is_object()) fail(f, ": header is not a JSON object");
    data_ = file_->data() + 8 + n;
    const size_t data_size = size - 8 - size_t(n);
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      const auto& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail(f, ": __metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail(f, ": __metadata__ value '", m.key(), "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      auto where = [&](auto&&... a) { fail(f, ": tensor '", name, "': ", a...); };
      if (!v.is_object()) where("entry is not an object");
      if (!v.contains("dtype") || !v["dtype"].is_string()) where("missing or non-string 'dtype'");
      if (!v.contains("shape") || !v["shape"].is_array()) where("missing or non-array 'shape'");
      if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
        where("missing 'data_offsets' [begin, end]");
      for (auto k = v.begin(); k != v.end(); ++k)
        if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets") where("unknown field '", k.key(), "'");
      TensorInfo ti;
      ti.name = name;
      const std::string ds = v["dtype"].get<std::string>();
      if (!parse_dtype(ds, ti.dtype)) where("unsupported dtype '", ds, "'");
      const auto& shp = v["shape"];
      if (shp.size() > size_t(kMaxRank)) where("rank ", shp.size(), " exceeds the supported ", kMaxRank);
      ti.shape = Shape::of_rank(int(shp.size()));
      uint64_t numel = 1;
      for (size_t i = 0; i < shp.size(); ++i) {
        if (!shp[i].is_number_unsigned()) where("shape entry ", i, " is not a non-negative integer");
        const uint64_t d = shp[i].get<uint64_t>();
        if (d > (uint64_t(1) << 40)) where("extent ", d, " is implausibly large");
        ti.shape.d[i] = int64_t(d);
        numel *= d;
        if (numel > (uint64_t(1) << 50)) where("element count overflows");
      }
      const auto& off = v["data_offsets"];
      if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
        where("data_offsets are not non-negative integers");
      const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
      if (b > e) where("data_offsets [", b, ", ", e, "] are reversed");
      if (e > data_size)
        where("data_offsets [", b, ", ", e, "] run past the data section (", data_size, " bytes): file truncated?");
      const uint64_t expect = numel * dtype_size(ti.dtype);
      if (e - b != expect)
        where("shape ", ti.shape.str(), " x ", dtype_name(ti.dtype), " needs ", expect, " bytes but data_offsets span ",
              e - b);
      ti.begin = size_t(b);
      ti.end = size_t(e);
      index_[name] = infos_.size();
      infos_.push_back(ti);
    }
    std::vector<const TensorInfo*> order;
    for (auto& t : infos_)
      if (t.end > t.begin) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    const TensorInfo* reach = nullptr;  // the tensor extending furthest so far
    for (const TensorInfo* t : order) {
      if (reach && t->begin < reach->end)
        fail(f, ": tensors '", reach->name, "' [", reach->begin, ", ", reach->end, ") and '", t->name, "' [", t->begin,
             ", ", t->end, ") overlap");
      if (!reach || t->end > reach->end) reach = t;
    }
  }

  std::shared_ptr<detail::MappedFile> file_;
  const uint8_t* data_ = nullptr;
  std::vector<TensorInfo> infos_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (any backend is copied to the host) and writes them in one go.
class SafeTensorsWriter {
 public:
  template <class T, class B>
  void add(const std::string& name, const Tensor<T, B>& t) {
    TTT_CHECK(!name.empty() && name != "__metadata__", "safetensors: invalid tensor name '", name, "'");
    TTT_CHECK(!entries_.count(name), "safetensors: tensor '", name, "' added twice");
    Entry e;
    e.dtype = dtype_v<T>;
    e.shape = t.shape();
    auto host = t.template to<Cpu>();
    e.bytes.resize(host.nbytes());
    if (!e.bytes.empty()) std::memcpy(e.bytes.data(), host.data(), e.bytes.size());
    entries_[name] = std::move(e);
  }
  void add_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  // Writes `path` atomically: a crash or a full disk never leaves a partial file under
  // the final name.
  void write(const std::string& path) const {
    nlohmann::json h = nlohmann::json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    size_t off = 0;
    for (auto& [name, e] : entries_) {
      std::vector<int64_t> shape(e.shape.d, e.shape.d + e.shape.rank);
      h[name] = {{"dtype", std::string(dtype_name(e.dtype))}, {"shape", shape}, {"data_offsets", {off, off + e.bytes.size()}}};
      off += e.bytes.size();
    }
    std::string hs = h.dump();
    while ((8 + hs.size()) % 8) hs.push_back(' ');
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    FILE* fp = std::fopen(tmp.c_str(), "wb");
    if (!fp) fail(path, ": cannot write (", std::strerror(errno), ")");
    uint8_t len[8];
    uint64_t n = hs.size();
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, fp) == 8 && std::fwrite(hs.data(), 1, hs.size(), fp) == hs.size();
    for (auto& [name, e] : entries_)
      ok = ok && (e.bytes.empty() || std::fwrite(e.bytes.data(), 1, e.bytes.size(), fp) == e.bytes.size());
    ok = (std::fflush(fp) == 0) && ok;
    ok = (std::fclose(fp) == 0) && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
      int e = errno;
      std::remove(tmp.c_str());
      fail(path, ": write failed (", std::strerror(e), ")");
    }
  }

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    std::vector<uint8_t> bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// One tensor of known shape written piece by piece straight to disk (a long generation's
// output never sits in memory), then atomically renamed into place by finish(). Without
// finish() (an error, an interrupted run) the temporary file is removed.
template <class T>
class SafeTensorsStreamWriter {
 public:
  SafeTensorsStreamWriter(const std::string& path, const std::string& name, const Shape& shape)
      : path_(path), tmp_(path + ".tmp." + std::to_string(::getpid())), numel_(shape.numel()) {
    std::vector<int64_t> dims(shape.d, shape.d + shape.rank);
    nlohmann::json h = {{name, {{"dtype", std::string(dtype_name(dtype_v<T>))},
                                {"shape", dims},
                                {"data_offsets", {0, size_t(numel_) * sizeof(T)}}}}};
    std::string hs = h.dump();
    while ((8 + hs.size()) % 8) hs.push_back(' ');
    header_ = 8 + hs.size();
    fp_ = std::fopen(tmp_.c_str(), "wb+");
    if (!fp_) fail(path, ": cannot write (", std::strerror(errno), ")");
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(hs.size()) >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, fp_) == 8 && std::fwrite(hs.data(), 1, hs.size(), fp_) == hs.size();
    // Size the file up front: unwritten elements read as zeros.
    ok = ok && (numel_ == 0 || (std::fseek(fp_, long(header_ + size_t(numel_) * sizeof(T) - 1), SEEK_SET) == 0 &&
                                std::fputc(0, fp_) != EOF));
    if (!ok) abort_with("cannot write");
  }
  ~SafeTensorsStreamWriter() {
    if (fp_) {
      std::fclose(fp_);
      std::remove(tmp_.c_str());
    }
  }
  SafeTensorsStreamWriter(const SafeTensorsStreamWriter&) = delete;
  SafeTensorsStreamWriter& operator=(const SafeTensorsStreamWriter&) = delete;

  // Element at flat (row-major) index i.
  void set(int64_t i, T v) {
    TTT_CHECK(i >= 0 && i < numel_, path_, ": element ", i, " out of range");
    if (std::fseek(fp_, long(header_ + size_t(i) * sizeof(T)), SEEK_SET) != 0 || std::fwrite(&v, sizeof(T), 1, fp_) != 1)
      abort_with("write failed");
  }
  void finish() {
    const bool ok = std::fflush(fp_) == 0;
    const int closed = std::fclose(fp_);
    fp_ = nullptr;
    if (!ok || closed != 0 || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int e = errno;
      std::remove(tmp_.c_str());
      fail(path_, ": write failed (", std::strerror(e), ")");
    }
  }

 private:
  [[noreturn]] void abort_with(const char* what) {
    const int e = errno;
    if (fp_) std::fclose(fp_);
    fp_ = nullptr;
    std::remove(tmp_.c_str());
    fail(path_, ": ", what, " (", std::strerror(e), ")");
  }
  std::string path_, tmp_;
  int64_t numel_;
  size_t header_ = 0;
  FILE* fp_ = nullptr;
};

}  // namespace ttt::io
