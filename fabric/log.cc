#include "fabric/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <string>

namespace mf {

Status InitLogging(std::string_view level) {
  auto parsed = spdlog::level::from_str(std::string(level));
  if (parsed == spdlog::level::off && level != "off") {
    return InvalidArgument("unknown log level '" + std::string(level) +
                           "'; use trace, debug, info, warn, error or off");
  }
  auto logger = spdlog::get("memfabric");
  if (!logger) logger = spdlog::stderr_color_mt("memfabric");
  spdlog::set_default_logger(logger);
  spdlog::set_level(parsed);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  return Status::Ok();
}

}  // namespace mf
