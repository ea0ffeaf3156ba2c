// The forward op cases of the generic harness, compiled into the GPU test binary as they are.
#include "../backend/forward_cases_test.cpp"
