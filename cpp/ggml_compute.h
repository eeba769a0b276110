// Small ggml graphs run on a chosen backend: the NAMM scorer's networks and the attention reductions that must
// happen where llama.cpp computed the attention (on a GPU, copying whole attention matrices to the host would cost
// more than the decode itself; namm-spec.md §8.1).
//
// The pattern is ggml's magika example: build a graph per call in a no_alloc context, let a reusable allocator place
// its intermediate tensors, set the inputs, compute, read the outputs. Tensors of another graph (llama.cpp's
// attention probabilities) enter as leaves that alias the other graph's memory (`external`), so building our graph
// never walks into theirs.
#pragma once

#include <cstdint>
#include <string>

struct ggml_backend;
struct ggml_backend_device;
struct ggml_context;
struct ggml_cgraph;
struct ggml_gallocr;
struct ggml_tensor;

namespace pm {

class Graph {
public:
    explicit Graph(size_t max_nodes);
    ~Graph();
    Graph(const Graph &) = delete;
    Graph & operator=(const Graph &) = delete;

    ggml_context * ctx() const { return ctx_; }
    // A new f32 input tensor (allocated by allocate(); set it afterwards with ggml_backend_tensor_set).
    ggml_tensor * input(int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1, int64_t ne3 = 1);
    // A leaf with `other`'s shape, strides and memory (a tensor of another graph or buffer); never written here.
    ggml_tensor * external(const ggml_tensor * other);
    // Marks t as an output and adds it (and what it depends on) to the graph. Also for ggml_cpy into state.
    void output(ggml_tensor * t);
    void allocate(ggml_gallocr * allocator);
    void compute(ggml_backend * backend);
    int n_nodes() const;

private:
    ggml_context * ctx_ = nullptr;
    ggml_cgraph * graph_ = nullptr;
};

// The device that holds a tensor's memory (the CPU device for host buffers).
ggml_backend_device * device_of(const ggml_tensor * tensor);
std::string device_name(ggml_backend_device * device);

// A backend of one device, created from a tensor the first time (bind), with an allocator for graphs on it. Every
// later tensor must live on the same device.
class DeviceCompute {
public:
    explicit DeviceCompute(int32_t n_threads) : n_threads_(n_threads) {}
    ~DeviceCompute();
    DeviceCompute(const DeviceCompute &) = delete;
    DeviceCompute & operator=(const DeviceCompute &) = delete;

    // Creates the backend for `tensor`'s device on first use; throws unsupported if `tensor` lives elsewhere.
    void bind(const ggml_tensor * tensor, const char * what);
    bool bound() const { return backend_ != nullptr; }
    ggml_backend * backend() const { return backend_; }
    ggml_backend_device * device() const { return device_; }
    std::string name() const;
    void set_threads(int32_t n_threads);
    // Threads for the next computes: n (capped at the configured count), or 0 for the configured count.
    void set_active_threads(int32_t n);

    void allocate(Graph & graph);  // then set the inputs, then compute()
    void compute(Graph & graph);

private:
    int32_t n_threads_ = 0;
    int32_t active_threads_ = -1;  // what the backend is set to now
    ggml_backend_device * device_ = nullptr;
    ggml_backend * backend_ = nullptr;
    ggml_gallocr * allocator_ = nullptr;
};

// Sets the thread count of a CPU-like backend (no-op for GPUs); n_threads <= 0: all hardware threads.
void set_backend_threads(ggml_backend * backend, int32_t n_threads);

}  // namespace pm
