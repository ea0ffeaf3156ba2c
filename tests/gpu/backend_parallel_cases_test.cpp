// The parallel op cases of the generic harness, compiled into the GPU test binary as they are.
#include "../backend/parallel_cases_test.cpp"
