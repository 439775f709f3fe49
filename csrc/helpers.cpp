// megaocto._helpers: index-building loops for the GPT dataset and blending (Megatron semantics).
//
// Plain CPython extension (only <Python.h>): arguments are Python buffer objects (numpy arrays),
// outputs are preallocated by the caller (megaocto/data/index_helpers.py), which also holds the
// numpy fallback used when this module is not compiled. Both must give identical results.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// A contiguous buffer holding signed integers of 4 or 8 bytes.
struct IntView {
  Py_buffer view{};
  bool ok = false;
  int64_t at(Py_ssize_t i) const {
    const char* base = static_cast<const char*>(view.buf);
    if (view.itemsize == 4) return static_cast<const int32_t*>(view.buf)[i];
    int64_t v;
    std::memcpy(&v, base + i * 8, 8);
    return v;
  }
  Py_ssize_t len() const { return view.len / view.itemsize; }
  ~IntView() {
    if (ok) PyBuffer_Release(&view);
  }
};

bool is_signed_int(const Py_buffer& v) {
  const char* f = v.format ? v.format : "B";
  if (*f == '<' || *f == '=' || *f == '@') ++f;
  return (v.itemsize == 4 && (*f == 'i' || *f == 'l')) || (v.itemsize == 8 && (*f == 'q' || *f == 'l'));
}

bool get_ints(PyObject* obj, IntView& out, const char* name, bool writable) {
  int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj, &out.view, flags) != 0) return false;
  out.ok = true;
  if (!is_signed_int(out.view)) {
    PyErr_Format(PyExc_TypeError, "%s must be a contiguous int32 or int64 array (format %s, itemsize %zd)", name,
                 out.view.format ? out.view.format : "?", out.view.itemsize);
    return false;
  }
  return true;
}

// build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, out)
// out: int64 [num_samples + 1, 2] (row = index into doc_idx, token offset in that document).
PyObject* build_sample_idx(PyObject*, PyObject* args) {
  PyObject *sizes_obj, *doc_obj, *out_obj;
  long long seq_length, num_epochs, tokens_per_epoch;
  if (!PyArg_ParseTuple(args, "OOLLLO", &sizes_obj, &doc_obj, &seq_length, &num_epochs, &tokens_per_epoch,
                        &out_obj))
    return nullptr;
  IntView sizes, doc_idx;
  Py_buffer out{};
  if (!get_ints(sizes_obj, sizes, "sizes", false) || !get_ints(doc_obj, doc_idx, "doc_idx", false)) return nullptr;
  if (PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) != 0) return nullptr;
  if (seq_length <= 0) {
    PyBuffer_Release(&out);
    PyErr_SetString(PyExc_ValueError, "seq_length must be positive");
    return nullptr;
  }
  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
  if (out.itemsize != 8 || out.len != static_cast<Py_ssize_t>((num_samples + 1) * 2 * 8)) {
    PyBuffer_Release(&out);
    PyErr_Format(PyExc_ValueError, "out must be an int64 array of shape [%lld, 2]",
                 static_cast<long long>(num_samples + 1));
    return nullptr;
  }
  int64_t* res = static_cast<int64_t*>(out.buf);
  const Py_ssize_t n_docs = doc_idx.len(), n_sizes = sizes.len();
  bool overrun = false, bad_doc = false;
  Py_BEGIN_ALLOW_THREADS
  int64_t doc_idx_index = 0, doc_offset = 0;
  res[0] = 0;
  res[1] = 0;
  for (int64_t s = 1; s <= num_samples && !overrun && !bad_doc; ++s) {
    int64_t remaining = seq_length + 1;
    while (remaining != 0) {
      if (doc_idx_index >= n_docs) {
        overrun = true;
        break;
      }
      const int64_t doc_id = doc_idx.at(doc_idx_index);
      if (doc_id < 0 || doc_id >= n_sizes) {
        bad_doc = true;
        break;
      }
      const int64_t doc_length = sizes.at(doc_id) - doc_offset;
      remaining -= doc_length;
      if (remaining <= 0) {
        doc_offset += remaining + doc_length - 1;
        remaining = 0;
      } else {
        ++doc_idx_index;
        doc_offset = 0;
      }
    }
    res[2 * s] = doc_idx_index;
    res[2 * s + 1] = doc_offset;
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&out);
  if (overrun) {
    PyErr_SetString(PyExc_ValueError, "doc_idx holds fewer tokens than num_epochs * tokens_per_epoch");
    return nullptr;
  }
  if (bad_doc) {
    PyErr_SetString(PyExc_ValueError, "doc_idx holds a document id outside sizes");
    return nullptr;
  }
  Py_RETURN_NONE;
}

// build_blending_indices(weights float64[D], dataset_index uint8[size] out, dataset_sample_index int64[size] out)
// Greedy: at step t pick argmax_i (w_i * max(t, 1) - count_i), ties to the lowest i.
PyObject* build_blending_indices(PyObject*, PyObject* args) {
  PyObject *w_obj, *di_obj, *dsi_obj;
  if (!PyArg_ParseTuple(args, "OOO", &w_obj, &di_obj, &dsi_obj)) return nullptr;
  Py_buffer w{}, di{}, dsi{};
  if (PyObject_GetBuffer(w_obj, &w, PyBUF_C_CONTIGUOUS) != 0) return nullptr;
  if (PyObject_GetBuffer(di_obj, &di, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
    PyBuffer_Release(&w);
    return nullptr;
  }
  if (PyObject_GetBuffer(dsi_obj, &dsi, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
    PyBuffer_Release(&w);
    PyBuffer_Release(&di);
    return nullptr;
  }
  const Py_ssize_t d = w.len / 8, size = di.len;
  const char* err = nullptr;
  if (w.itemsize != 8 || d < 1 || d > 255) err = "weights must be a float64 array of 1..255 entries";
  else if (di.itemsize != 1) err = "dataset_index must be a uint8 array";
  else if (dsi.itemsize != 8 || dsi.len != size * 8) err = "dataset_sample_index must be int64 of the same length";
  if (err == nullptr) {
    const double* weights = static_cast<const double*>(w.buf);
    uint8_t* out_d = static_cast<uint8_t*>(di.buf);
    int64_t* out_s = static_cast<int64_t*>(dsi.buf);
    std::vector<int64_t> count(d, 0);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t t = 0; t < size; ++t) {
      const double tt = t > 1 ? static_cast<double>(t) : 1.0;
      Py_ssize_t best = 0;
      double best_err = weights[0] * tt - static_cast<double>(count[0]);
      for (Py_ssize_t i = 1; i < d; ++i) {
        const double e = weights[i] * tt - static_cast<double>(count[i]);
        if (e > best_err) {
          best_err = e;
          best = i;
        }
      }
      out_d[t] = static_cast<uint8_t>(best);
      out_s[t] = count[best];
      ++count[best];
    }
    Py_END_ALLOW_THREADS
  }
  PyBuffer_Release(&w);
  PyBuffer_Release(&di);
  PyBuffer_Release(&dsi);
  if (err != nullptr) {
    PyErr_SetString(PyExc_ValueError, err);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"build_sample_idx", build_sample_idx, METH_VARARGS,
     "build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, out_int64[n+1,2])"},
    {"build_blending_indices", build_blending_indices, METH_VARARGS,
     "build_blending_indices(weights_f64, out_dataset_index_u8, out_dataset_sample_index_i64)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_helpers", "megaocto index-building helpers (C++)", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__helpers(void) { return PyModule_Create(&module); }
