#include "fabric/url.h"

#include <charconv>

namespace mf::fabric {

std::string_view SchemeName(Scheme scheme) {
  switch (scheme) {
    case Scheme::kTcp: return "tcp";
    case Scheme::kTls: return "tls";
    case Scheme::kRdma: return "rdma";
    case Scheme::kAuto: return "auto";
  }
  return "?";
}

Status ParseHostPort(std::string_view text, std::string* host, uint16_t* port) {
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    size_t close = text.find(']');
    if (close == std::string_view::npos)
      return InvalidArgument("unclosed '[' in address '" + std::string(text) + "'");
    *host = std::string(text.substr(1, close - 1));
    std::string_view rest = text.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':')
        return InvalidArgument("expected ':PORT' after ']' in '" + std::string(text) + "'");
      port_text = rest.substr(1);
    }
  } else {
    size_t colon = text.rfind(':');
    if (colon != std::string_view::npos && text.find(':') != colon) {
      return InvalidArgument("IPv6 address '" + std::string(text) + "' must be bracketed, e.g. [::1]:7411");
    }
    *host = std::string(text.substr(0, colon));
    if (colon != std::string_view::npos) port_text = text.substr(colon + 1);
  }
  if (host->empty()) return InvalidArgument("missing host in '" + std::string(text) + "'");
  if (port_text.empty()) {
    *port = kDefaultPort;
    return Status::Ok();
  }
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), value);
  if (ec != std::errc() || end != port_text.data() + port_text.size() || value > 65535) {
    return InvalidArgument("bad port '" + std::string(port_text) + "': expected a number from 0 to 65535");
  }
  *port = static_cast<uint16_t>(value);
  return Status::Ok();
}

Result<Url> ParseUrl(std::string_view text) {
  Url url;
  size_t sep = text.find("://");
  if (sep == std::string_view::npos) {
    return InvalidArgument(
        "'" + std::string(text) +
        "' is not a memfabric URL; expected SCHEME://HOST[:PORT][/REGION] with SCHEME one of "
        "tcp, tls, rdma, auto (e.g. tcp://127.0.0.1:7411/cache)");
  }
  std::string_view scheme = text.substr(0, sep);
  if (scheme == "tcp") {
    url.scheme = Scheme::kTcp;
  } else if (scheme == "tls") {
    url.scheme = Scheme::kTls;
  } else if (scheme == "rdma") {
    url.scheme = Scheme::kRdma;
  } else if (scheme == "auto") {
    url.scheme = Scheme::kAuto;
  } else {
    return InvalidArgument("unknown scheme '" + std::string(scheme) + "'; use tcp, tls, rdma or auto");
  }
  std::string_view rest = text.substr(sep + 3);
  size_t slash = rest.find('/');
  std::string_view authority = rest.substr(0, slash);
  MF_RETURN_IF_ERROR(ParseHostPort(authority, &url.host, &url.port));
  if (slash != std::string_view::npos) {
    url.region = std::string(rest.substr(slash + 1));
    if (url.region.find('/') != std::string::npos) {
      return InvalidArgument("region name '" + url.region + "' may not contain '/'");
    }
  }
  return url;
}

std::string Url::ToString() const {
  std::string s(SchemeName(scheme));
  s += "://";
  if (host.find(':') != std::string::npos) {
    s += "[" + host + "]";
  } else {
    s += host;
  }
  s += ":" + std::to_string(port);
  if (!region.empty()) s += "/" + region;
  return s;
}

}  // namespace mf::fabric
