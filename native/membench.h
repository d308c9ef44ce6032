// Measures how fast this machine streams memory into the cores: the bound decode runs against.
#pragma once
#include <cstddef>

namespace dllama {

// Best of `repeats` timed passes of n_threads threads each summing its share of a buffer of
// `bytes` bytes (far larger than the caches). Returns bytes per second.
double measure_read_bandwidth(size_t bytes, int n_threads, int repeats);

}  // namespace dllama
