#pragma once
// JSON config access with errors that name the file and key. Thin over nlohmann-json.
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "ttt/core/error.hpp"

namespace ttt::io {

using Json = nlohmann::json;

inline Json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return Json::parse(ss.str());
  } catch (const Json::exception& e) {  // parse_error, and out_of_range for numbers like 1E6384
    fail(path, ": malformed JSON (", e.what(), ")");
  }
}

// A JSON object with a name for messages ("config.json", "config.json: ttt[1]").
class JsonView {
 public:
  JsonView(const Json& j, std::string where) : j_(&j), where_(std::move(where)) {
    TTT_CHECK(j.is_object(), where_, ": expected a JSON object");
  }
  const std::string& where() const { return where_; }
  const Json& raw() const { return *j_; }
  bool has(const std::string& key) const { return j_->contains(key) && !(*j_)[key].is_null(); }

  template <class T>
  T get(const std::string& key) const {
    if (!j_->contains(key)) fail(where_, ": missing key '", key, "'");
    return convert<T>(key, (*j_)[key]);
  }
  // Missing or null gives the default.
  template <class T>
  T get(const std::string& key, const T& def) const {
    if (!has(key)) return def;
    return convert<T>(key, (*j_)[key]);
  }
  template <class T>
  std::optional<T> get_optional(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    return convert<T>(key, (*j_)[key]);
  }
  JsonView child(const std::string& key) const {
    if (!j_->contains(key)) fail(where_, ": missing key '", key, "'");
    return JsonView((*j_)[key], where_ + ": " + key);
  }

  template <class T>
  T convert(const std::string& key, const Json& v) const {
    auto bad = [&](const char* what) -> T {
      fail(where_, ": key '", key, "' must be ", what, ", got ", v.dump());
    };
    if constexpr (std::is_same_v<T, bool>) {
      if (!v.is_boolean()) return bad("true or false");
      return v.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      const double lo = double(std::numeric_limits<T>::min()), hi = double(std::numeric_limits<T>::max());
      if (!v.is_number_integer()) {
        // 4.0 is accepted as 4; 4.5 is not (range first: the cast of a huge double is UB).
        if (v.is_number_float()) {
          const double d = v.get<double>();
          if (d >= lo && d <= hi && double(int64_t(d)) == d) return T(d);
        }
        return bad("an integer");
      }
      if (v.is_number_unsigned() ? double(v.get<uint64_t>()) > hi
                                 : (double(v.get<int64_t>()) < lo || double(v.get<int64_t>()) > hi))
        return bad("an integer in range");
      return v.get<T>();
    } else if constexpr (std::is_floating_point_v<T>) {
      if (!v.is_number()) return bad("a number");
      return v.get<T>();
    } else if constexpr (std::is_same_v<T, std::string>) {
      if (!v.is_string()) return bad("a string");
      return v.get<std::string>();
    } else if constexpr (std::is_same_v<T, std::vector<int>> || std::is_same_v<T, std::vector<int64_t>>) {
      if (!v.is_array()) return bad("a list of integers");
      T out;
      for (auto& e : v) {
        if (!e.is_number_integer()) return bad("a list of integers");
        out.push_back(e.get<typename T::value_type>());
      }
      return out;
    } else {
      return v.get<T>();
    }
  }

 private:
  const Json* j_;
  std::string where_;
};

}  // namespace ttt::io
