// pybind11 module freezert._C: integer pointers in, nothing torch-specific (no libtorch link).
// The GIL is released around every kernel; C++ exceptions surface as Python exceptions
// (std::invalid_argument -> ValueError, std::out_of_range -> IndexError, else RuntimeError).
#include <pybind11/pybind11.h>

#include "common.h"
#include "ops.h"

#ifndef FREEZERT_VERSION
#define FREEZERT_VERSION "0+unknown"
#endif
#ifndef FREEZERT_CUDA_ARCHS
#define FREEZERT_CUDA_ARCHS ""
#endif

namespace py = pybind11;
using namespace freezert;

PYBIND11_MODULE(_C, m) {
  m.doc() = "freezert native kernels: row hashing and feature-cache codecs (CPU, optional CUDA)";
  m.attr("__version__") = FREEZERT_VERSION;
  m.attr("ABI") = kAbiVersion;
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("hash_rows_cpu", &hash_rows_cpu, py::arg("x"), py::arg("rows"), py::arg("row_bytes"),
        py::arg("seed"), py::arg("out"), release());
  m.def("encode_scatter_cpu", &encode_scatter_cpu, py::arg("src"), py::arg("src_elem"), py::arg("index"),
        py::arg("batch"), py::arg("dim"), py::arg("store"), py::arg("store_elem"), py::arg("scales"),
        py::arg("n_rows"), release());
  m.def("gather_decode_cpu", &gather_decode_cpu, py::arg("store"), py::arg("store_elem"), py::arg("scales"),
        py::arg("index"), py::arg("batch"), py::arg("dim"), py::arg("n_rows"), py::arg("out"),
        py::arg("out_elem"), release());

#ifdef FREEZERT_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = FREEZERT_CUDA_ARCHS;
  m.def("cuda_device_count", &cuda_device_count, release());
  m.def("cuda_status", &cuda_status, release());
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.def("hash_rows_cuda", &hash_rows_cuda, py::arg("x"), py::arg("rows"), py::arg("row_bytes"),
        py::arg("seed"), py::arg("out"), py::arg("device"), py::arg("stream"), release());
  m.def("encode_scatter_cuda", &encode_scatter_cuda, py::arg("src"), py::arg("src_elem"), py::arg("index"),
        py::arg("batch"), py::arg("dim"), py::arg("store"), py::arg("store_elem"), py::arg("scales"),
        py::arg("n_rows"), py::arg("store_on_host"), py::arg("device"), py::arg("stream"), release());
  m.def("gather_decode_cuda", &gather_decode_cuda, py::arg("store"), py::arg("store_elem"), py::arg("scales"),
        py::arg("index"), py::arg("batch"), py::arg("dim"), py::arg("n_rows"), py::arg("out"),
        py::arg("out_elem"), py::arg("store_on_host"), py::arg("device"), py::arg("stream"), release());
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = "";
#endif
}
