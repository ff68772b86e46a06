#pragma once
// WeightSource: the one place where the names a module asks for meet what a checkpoint
// holds. It converts dtypes, checks shapes, merges LoRA adapters, accepts synthesised
// tensors (initialised weights a checkpoint lacks) and remembers which keys were used, so
// a loader can report every missing, mis-shaped or unused key with the file it came from.
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "ttt/backend/cpu/kernels.hpp"
#include "ttt/io/safetensors.hpp"

namespace ttt::io {

// How to make a tensor a checkpoint does not have: random normal (truncated at 3 std,
// like moshi's trunc_normal_ init) or a constant.
struct Init {
  enum class Kind { normal, constant } kind = Kind::normal;
  float value = 0.02f;  // std for normal, the value for constant
  static Init normal(float std) { return {Kind::normal, std}; }
  static Init constant(float v) { return {Kind::constant, v}; }
};

namespace detail {
inline uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
// Deterministic in (seed, name): the same model comes out whatever order modules load in,
// and on whichever backend it is made (ops::random_normal).
inline Tensor<float, Cpu> make_init(const Shape& shape, const Init& init, uint64_t seed, const std::string& name) {
  auto t = Tensor<float, Cpu>::empty(shape);
  if (init.kind == Init::Kind::constant) ops::fill(t, init.value);
  else ops::random_normal(t, init.value, seed, fnv1a(name));
  return t;
}
}  // namespace detail

class WeightSource {
 public:
  WeightSource() = default;
  explicit WeightSource(const std::string& path) { add_file(path); }

  void add_file(const std::string& path) {
    auto st = std::make_shared<SafeTensors>(SafeTensors::open(path));
    for (const auto& t : st->tensors()) {
      if (where_.count(t.name))
        fail(path, ": tensor '", t.name, "' also present in ", files_[where_[t.name]]->path());
      where_[t.name] = files_.size();
    }
    files_.push_back(st);
  }

  // LoRA adapters `<p>.lora_A.weight` [r, in] and `<p>.lora_B.weight` [out, r] beside a
  // frozen `<p>.frozen_W.weight` are merged as W + scaling * B @ A (moshi's lora.py).
  void set_lora_scaling(float s) { lora_scaling_ = s; }

  // A tensor the checkpoint does not have (e.g. freshly initialised TTT weights).
  void put(const std::string& name, Tensor<float, Cpu> t) { synth_[name] = std::move(t); }

  // With no checkpoint at all: every tensor asked for with an Init is made from `seed`.
  void enable_random_init(uint64_t seed) {
    random_ = true;
    seed_ = seed;
  }
  bool random_init() const { return random_; }

  // The storage the big linear weights get when they are read as floats (nn::linear_weight
  // quantises them at load): dense (default), int8 or fp8 e4m3.
  void set_weight_format(WeightFormat f) { weight_format_ = f; }
  WeightFormat weight_format() const { return weight_format_; }
  // The format of a tensor stored quantised (a `<name>_scale` beside it): the metadata key
  // "ttt.weight_format" of its file (docs/weights.md).
  WeightFormat quant_format(const std::string& name) const {
    auto it = where_.find(name);
    if (it == where_.end()) fail("weights (", description(), "): missing quantised tensor '", name, "'");
    const auto& md = files_[it->second]->metadata();
    auto m = md.find("ttt.weight_format");
    WeightFormat f = WeightFormat::dense;
    if (m == md.end() || !parse_weight_format(m->second, f) || f == WeightFormat::dense)
      fail(files_[it->second]->path(), ": tensor '", name, "' has a '", name,
           "_scale' but the file's metadata 'ttt.weight_format' is ",
           m == md.end() ? std::string("missing") : "'" + m->second + "'", " (expected int8 or fp8_e4m3)");
    return f;
  }
  uint64_t seed() const { return seed_; }
  void set_seed(uint64_t seed) { seed_ = seed; }

  // Like get(), but a missing tensor is initialised (from the seed) when random init is
  // on or `allow_missing` says the checkpoint may lack it (new TTT weights in a released
  // Moshi checkpoint). Initialised names are listed by initialised().
  template <class T>
  Tensor<T, Cpu> get_or_init(const std::string& name, const Shape& shape, const Init& init,
                             bool allow_missing = false) {
    if (!has(name) && (random_ || allow_missing)) {
      synth_[name] = detail::make_init(shape, init, seed_, name);
      initialised_.push_back(name);
    }
    return get<T>(name, shape);
  }
  const std::vector<std::string>& initialised() const { return initialised_; }
  // New weights a released checkpoint lacks (TTT modules added to Moshi): made from the
  // seed by `init` when missing, and listed by initialised() so the loader can warn.
  void init_missing(const std::string& name, const Shape& shape, const Init& init) {
    if (has(name)) return;
    synth_[name] = detail::make_init(shape, init, seed_, name);
    initialised_.push_back(name);
  }
  void put_initialised(const std::string& name, Tensor<float, Cpu> t) {
    synth_[name] = std::move(t);
    initialised_.push_back(name);
  }

  // For modules that make a missing tensor themselves (on the device): true when `name`
  // should be initialised; the name is then recorded as initialised.
  bool claim_init(const std::string& name) {
    if (has(name) || !random_) return false;
    initialised_.push_back(name);
    return true;
  }

  bool has(const std::string& name) const {
    return where_.count(name) || synth_.count(name) || where_.count(lora_base(name));
  }

  // The tensor `name` converted to T; `shape` may contain -1 wildcards. Throws naming the
  // file, key, expected and found shapes.
  template <class T>
  Tensor<T, Cpu> get(const std::string& name, const Shape& shape) {
    Tensor<T, Cpu> t = fetch<T>(name);
    check_shape(name, t.shape(), shape);
    return t;
  }
  // Same, reshaped to `shape` when the element counts agree ([1, 1, D] norms as [D]).
  template <class T>
  Tensor<T, Cpu> get_as(const std::string& name, const Shape& shape) {
    Tensor<T, Cpu> t = fetch<T>(name);
    if (t.numel() != shape.numel())
      fail(source(name), ": tensor '", name, "' has shape ", t.shape().str(), ", expected ", shape.str(), " (",
           shape.numel(), " elements)");
    return t.contiguous().reshape(shape);
  }

  // Shape of a stored tensor (for configs inferred from checkpoints).
  Shape shape_of(const std::string& name) const {
    if (auto it = synth_.find(name); it != synth_.end()) return it->second.shape();
    auto it = where_.find(name);
    if (it == where_.end()) fail("weights: missing tensor '", name, "'");
    return files_[it->second]->info(name).shape;
  }

  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (auto& [n, i] : where_)
      if (!used_.count(n)) out.push_back(n);
    return out;
  }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (auto& [n, i] : where_) out.push_back(n);
    return out;
  }
  std::string description() const {
    std::string s;
    for (auto& f : files_) s += (s.empty() ? "" : ", ") + f->path();
    return s.empty() ? "<no file>" : s;
  }
  std::string source(const std::string& name) const {
    auto it = where_.find(name);
    if (it != where_.end()) return files_[it->second]->path();
    return description();
  }

 private:
  static std::string lora_base(const std::string& name) {
    const std::string suf = ".weight";
    if (name.size() < suf.size() || name.compare(name.size() - suf.size(), suf.size(), suf) != 0) return "";
    return name.substr(0, name.size() - suf.size()) + ".frozen_W.weight";
  }

  // A NaN or Inf weight would silently poison every output: refuse the checkpoint.
  template <class T>
  void check_finite(const Tensor<T, Cpu>& t, const std::string& name) const {
    if constexpr (is_floating_v<T>) {
      const T* p = t.data();
      const int64_t n = t.numel();
      int64_t bad = -1;
#pragma omp parallel for schedule(static) reduction(max : bad) if (n > (int64_t(1) << 20))
      for (int64_t i = 0; i < n; ++i) {
        float v;
        if constexpr (std::is_same_v<T, double>) v = float(p[i]);
        else v = to_f32(p[i]);
        if (!std::isfinite(v)) bad = std::max(bad, i);
      }
      if (bad >= 0)
        fail(source(name), ": tensor '", name, "' holds a non-finite value (", to_f32(p[bad]), " at flat index ", bad,
             ")");
    }
  }

  void check_shape(const std::string& name, const Shape& got, const Shape& want) const {
    bool ok = got.rank == want.rank;
    for (int i = 0; ok && i < want.rank; ++i) ok = want.d[i] < 0 || want.d[i] == got.d[i];
    if (!ok) fail(source(name), ": tensor '", name, "' has shape ", got.str(), ", expected ", want.str());
  }

  template <class T>
  Tensor<T, Cpu> fetch(const std::string& name) {
    if (auto it = synth_.find(name); it != synth_.end()) return ops::cast<T>(it->second);
    if (auto it = where_.find(name); it != where_.end()) {
      used_.insert(name);
      auto t = files_[it->second]->load<T>(name);
      check_finite(t, name);
      return t;
    }
    const std::string base = lora_base(name);
    if (!base.empty() && where_.count(base)) {
      const std::string p = name.substr(0, name.size() - 7);
      const std::string a = p + ".lora_A.weight", b = p + ".lora_B.weight";
      if (!where_.count(a) || !where_.count(b))
        fail(source(base), ": LoRA tensor '", base, "' without its '", a, "' and '", b, "'");
      auto W = files_[where_[base]]->load<float>(base).contiguous();
      auto A = files_[where_[a]]->load<float>(a), Bm = files_[where_[b]]->load<float>(b);
      TTT_CHECK(A.rank() == 2 && Bm.rank() == 2 && W.rank() == 2 && Bm.size(1) == A.size(0) &&
                    Bm.size(0) == W.size(0) && A.size(1) == W.size(1),
                source(base), ": LoRA shapes do not fit: W ", W.shape().str(), ", A ", A.shape().str(), ", B ",
                Bm.shape().str(), " for '", p, "'");
      auto merged = W.clone();
      ops::matmul(merged, Bm, A, lora_scaling_, 1.f);
      used_.insert(base);
      used_.insert(a);
      used_.insert(b);
      return ops::cast<T>(merged);
    }
    fail("weights (", description(), "): missing tensor '", name, "'");
  }

  std::vector<std::shared_ptr<SafeTensors>> files_;
  std::map<std::string, size_t> where_;
  std::map<std::string, Tensor<float, Cpu>> synth_;
  std::set<std::string> used_;
  float lora_scaling_ = 2.f;
  bool random_ = false;
  uint64_t seed_ = 0;
  std::vector<std::string> initialised_;
  WeightFormat weight_format_ = WeightFormat::dense;
};

}  // namespace ttt::io
