// Uses the headers from outside the project: a tensor op and a safetensors round trip.
#include <cstdio>

#include "ttt/io/safetensors.hpp"
#include "ttt/ttt.hpp"

int main() {
  using namespace ttt;
  auto a = Tensor<float, Cpu>::from_vector({2, 2}, {1, 2, 3, 4});
  auto b = ops::matmul(a, a);  // [[7, 10], [15, 22]]
  io::SafeTensorsWriter w;
  w.add("b", b);
  w.write("consumer.safetensors");
  auto back = io::SafeTensors::open("consumer.safetensors").load<float>("b");
  const bool ok = back(1, 1) == 22.f && back(0, 1) == 10.f;
  std::printf("consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
