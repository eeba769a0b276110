#include "spectrogram.h"

#include <cmath>

namespace pm::namm {

StftTables StftTables::make(double ema_coefficient) {
    StftTables t;
    const double pi = 3.14159265358979323846;
    for (int32_t n = 0; n < kFft; ++n) {
        // torch.hann_window(32, periodic=True): 0.5 - 0.5 cos(2 pi n / 32)
        const double hann = 0.5 - 0.5 * std::cos(2.0 * pi * n / kFft);
        for (int32_t f = 0; f < kBins; ++f) {
            const double angle = 2.0 * pi * f * n / kFft;
            t.cos_w[f][n] = float(hann * std::cos(angle));
            t.sin_w[f][n] = float(hann * std::sin(angle));
        }
    }
    t.a = float(std::pow(ema_coefficient, kHop));
    return t;
}

}  // namespace pm::namm
