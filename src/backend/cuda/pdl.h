// Programmatic dependent launch (pdl.cuh) of the decode kernels, RoPE and RMSNorm: on by default,
// DSV3_CUDA_PDL=0 turns it off at start-up and cuda_set_pdl at run time (benchmarks measure what it
// saves). Plain C++ header.
#pragma once

namespace dsv3 {

bool cuda_set_pdl(bool on);  // returns the previous setting

}  // namespace dsv3
