// Catch2 v2 needs one translation unit with the runner (v3 ships Catch2WithMain).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
