// Logging: spdlog, to stderr, with one set-up call for the binaries.
// Levels: trace, debug, info (default), warn, error, off. Libraries log through
// spdlog's default logger; tests may leave it at its defaults.
#pragma once

#include <spdlog/spdlog.h>

#include <string_view>

#include "fabric/status.h"

namespace mf {

// Sets the default logger's level and a compact pattern ("[time] [level] message").
Status InitLogging(std::string_view level);

}  // namespace mf
