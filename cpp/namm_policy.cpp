#include "namm_policy.h"

#include "engine.h"
#include "errors.h"

namespace pm {

std::unique_ptr<AttentionPolicy> make_namm_policy(const EngineParams &, uint32_t) {
    fail(ErrorKind::unsupported, "policy 'namm' is being integrated");
}

}  // namespace pm
