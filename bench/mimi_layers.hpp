#pragma once
// The convolution layers of Kyutai's Mimi per 80 ms streaming frame, for bench_mimi_ops (CPU) and
// bench_mimi_ops_cuda: SEANet (n_filters 64, ratios 8 6 5 4, kernel 7, residual kernel 3,
// compress 2, one residual layer) and the 25 Hz <-> 12.5 Hz resamplers.
#include <cstdint>

namespace mimi_bench {

struct Layer {
  const char* name;
  bool transpose;
  int64_t cin, cout, k, stride, groups, t;  // t: Tout for conv1d, Tin for conv_transpose1d
  bool bias;
};

inline const Layer kEncoder[] = {
    {"enc conv0 k7 1->64", false, 1, 64, 7, 1, 1, 1920, true},
    {"enc res0 k3 64->32", false, 64, 32, 3, 1, 1, 1920, true},
    {"enc res0 k1 32->64", false, 32, 64, 1, 1, 1, 1920, true},
    {"enc down0 k8/4 64->128", false, 64, 128, 8, 4, 1, 480, true},
    {"enc res1 k3 128->64", false, 128, 64, 3, 1, 1, 480, true},
    {"enc res1 k1 64->128", false, 64, 128, 1, 1, 1, 480, true},
    {"enc down1 k10/5 128->256", false, 128, 256, 10, 5, 1, 96, true},
    {"enc res2 k3 256->128", false, 256, 128, 3, 1, 1, 96, true},
    {"enc res2 k1 128->256", false, 128, 256, 1, 1, 1, 96, true},
    {"enc down2 k12/6 256->512", false, 256, 512, 12, 6, 1, 16, true},
    {"enc res3 k3 512->256", false, 512, 256, 3, 1, 1, 16, true},
    {"enc res3 k1 256->512", false, 256, 512, 1, 1, 1, 16, true},
    {"enc down3 k16/8 512->1024", false, 512, 1024, 16, 8, 1, 2, true},
    {"enc final k3 1024->512", false, 1024, 512, 3, 1, 1, 2, true},
    {"downsample k4/2 512->512", false, 512, 512, 4, 2, 1, 1, false},
};
inline const Layer kDecoder[] = {
    {"upsample convtr k4/2 dw512", true, 512, 512, 4, 2, 512, 1, false},
    {"dec conv0 k7 512->1024", false, 512, 1024, 7, 1, 1, 2, true},
    {"dec up0 convtr k16/8 1024->512", true, 1024, 512, 16, 8, 1, 2, true},
    {"dec res0 k3 512->256", false, 512, 256, 3, 1, 1, 16, true},
    {"dec res0 k1 256->512", false, 256, 512, 1, 1, 1, 16, true},
    {"dec up1 convtr k12/6 512->256", true, 512, 256, 12, 6, 1, 16, true},
    {"dec res1 k3 256->128", false, 256, 128, 3, 1, 1, 96, true},
    {"dec res1 k1 128->256", false, 128, 256, 1, 1, 1, 96, true},
    {"dec up2 convtr k10/5 256->128", true, 256, 128, 10, 5, 1, 96, true},
    {"dec res2 k3 128->64", false, 128, 64, 3, 1, 1, 480, true},
    {"dec res2 k1 64->128", false, 64, 128, 1, 1, 1, 480, true},
    {"dec up3 convtr k8/4 128->64", true, 128, 64, 8, 4, 1, 480, true},
    {"dec res3 k3 64->32", false, 64, 32, 3, 1, 1, 1920, true},
    {"dec res3 k1 32->64", false, 32, 64, 1, 1, 1, 1920, true},
    {"dec final k7 64->1", false, 64, 1, 7, 1, 1, 1920, true},
};

}  // namespace mimi_bench
