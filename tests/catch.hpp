#pragma once
// Catch2 v2 (Debian, CI) and v3 (the GPU machine) behind one include.
#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#define TTT_CATCH3 1
#define TTT_CONTAINS(s) Catch::Matchers::ContainsSubstring(s)
using Catch::Approx;
#else
#include <catch2/catch.hpp>
#define TTT_CATCH3 0
#define TTT_CONTAINS(s) Catch::Matchers::Contains(s)
#endif
#include <cstdlib>
#include <string>

// Path of a file under tests/data (the build passes TTT_TEST_DATA).
inline std::string test_data(const std::string& rel) { return std::string(TTT_TEST_DATA) + "/" + rel; }
inline std::string fixture(const std::string& rel) { return test_data("fixtures/" + rel); }
