// The extension's one translation unit. torch/extension.h (ATen and pybind11) is most of a build's
// time: compiled as one unit the kernels parse it once, not once per source file.
#include "elementwise.cpp"
#include "paged_attention.cpp"
