#include "ggml_compute.h"

#include "errors.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace pm {

Graph::Graph(size_t max_nodes) {
    ggml_init_params params{ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false),
                            nullptr, /*no_alloc=*/true};
    ctx_ = ggml_init(params);
    if (!ctx_) fail(ErrorKind::runtime, "could not create a ggml context");
    graph_ = ggml_new_graph_custom(ctx_, max_nodes, false);
}

Graph::~Graph() { ggml_free(ctx_); }

ggml_tensor * Graph::input(int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3) {
    ggml_tensor * t = ggml_new_tensor_4d(ctx_, GGML_TYPE_F32, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    return t;
}

ggml_tensor * Graph::external(const ggml_tensor * other) {
    ggml_tensor * t = ggml_new_tensor(ctx_, other->type, GGML_MAX_DIMS, other->ne);
    std::copy(std::begin(other->nb), std::end(other->nb), std::begin(t->nb));
    // Already placed: the allocator leaves tensors with data alone, and an op-less leaf ends graph traversal.
    t->buffer = other->buffer;
    t->data = other->data;
    return t;
}

void Graph::output(ggml_tensor * t) {
    ggml_set_output(t);
    ggml_build_forward_expand(graph_, t);
}

void Graph::allocate(ggml_gallocr * allocator) {
    if (!ggml_gallocr_alloc_graph(allocator, graph_)) fail(ErrorKind::runtime, "could not allocate a ggml graph");
}

void Graph::compute(ggml_backend * backend) {
    if (ggml_backend_graph_compute(backend, graph_) != GGML_STATUS_SUCCESS) {
        fail(ErrorKind::runtime, std::string("a ggml graph failed to compute on ") + ggml_backend_name(backend));
    }
}

int Graph::n_nodes() const { return ggml_graph_n_nodes(graph_); }

ggml_backend_dev_t device_of(const ggml_tensor * tensor) {
    if (!tensor->buffer) fail(ErrorKind::runtime, "tensor has no backend buffer");
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(tensor->buffer));
    if (!dev && ggml_backend_buffer_is_host(tensor->buffer)) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) fail(ErrorKind::unsupported, "cannot tell which device holds a tensor");
    return dev;
}

std::string device_name(ggml_backend_dev_t device) { return device ? ggml_backend_dev_name(device) : "none"; }

void set_backend_threads(ggml_backend_t backend, int32_t n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto set_n_threads = reg ? reinterpret_cast<ggml_backend_set_n_threads_t>(
                                   ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"))
                             : nullptr;
    if (set_n_threads) {  // only CPU-like backends have threads
        const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
        set_n_threads(backend, n_threads > 0 ? n_threads : int32_t(hw));
    }
}

DeviceCompute::~DeviceCompute() {
    if (allocator_) ggml_gallocr_free(allocator_);
    if (backend_) ggml_backend_free(backend_);
}

void DeviceCompute::bind(const ggml_tensor * tensor, const char * what) {
    ggml_backend_dev_t dev = device_of(tensor);
    if (backend_) {
        if (dev != device_) {
            fail(ErrorKind::unsupported,
                 std::string(what) + " lives on " + device_name(dev) + " but earlier ones on " + device_name(device_) +
                     "; attention-scored policies need every layer on one device (n_gpu_layers=0 or -1)");
        }
        return;
    }
    backend_ = ggml_backend_dev_init(dev, nullptr);
    if (!backend_) fail(ErrorKind::runtime, "could not start a ggml backend on " + device_name(dev));
    device_ = dev;
    set_backend_threads(backend_, n_threads_);
    active_threads_ = -1;
    allocator_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
}

std::string DeviceCompute::name() const { return backend_ ? ggml_backend_name(backend_) : "unbound"; }

void DeviceCompute::set_threads(int32_t n_threads) {
    n_threads_ = n_threads;
    active_threads_ = -1;
    if (backend_) set_active_threads(0);
}

void DeviceCompute::set_active_threads(int32_t n) {
    const int32_t configured = n_threads_ > 0 ? n_threads_ : int32_t(std::max(1u, std::thread::hardware_concurrency()));
    const int32_t wanted = n > 0 ? std::min(n, configured) : configured;
    if (backend_ && wanted != active_threads_) {
        set_backend_threads(backend_, wanted);
        active_threads_ = wanted;
    }
}

void DeviceCompute::allocate(Graph & graph) {
    if (!backend_) fail(ErrorKind::runtime, "internal: DeviceCompute used before bind()");
    graph.allocate(allocator_);
}

void DeviceCompute::compute(Graph & graph) { graph.compute(backend_); }

}  // namespace pm
