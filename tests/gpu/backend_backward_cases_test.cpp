// The backward op cases of the generic harness, compiled into the GPU test binary as they are.
#include "../backend/backward_cases_test.cpp"
