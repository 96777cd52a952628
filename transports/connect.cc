#include "transports/connect.h"

#include <spdlog/spdlog.h>

#include "transports/tcp/tcp_client.h"

namespace mf::transports {

Result<std::unique_ptr<fabric::Client>> Connect(const fabric::Url& url, const ClientOptions& options) {
  switch (url.scheme) {
    case fabric::Scheme::kTcp:
    case fabric::Scheme::kTls: {
      MF_ASSIGN_OR_RETURN(auto client,
                          tcp::TcpClient::Connect(url, options, url.scheme == fabric::Scheme::kTls));
      return std::unique_ptr<fabric::Client>(std::move(client));
    }
    case fabric::Scheme::kRdma: return Unsupported("RDMA transport is not built yet");
    case fabric::Scheme::kAuto: {
      spdlog::info("{}: using TCP: the RDMA transport is not built yet", url.ToString());
      fabric::Url tcp_url = url;
      tcp_url.scheme = fabric::Scheme::kTcp;
      MF_ASSIGN_OR_RETURN(auto client, tcp::TcpClient::Connect(tcp_url, options, false));
      return std::unique_ptr<fabric::Client>(std::move(client));
    }
  }
  return InvalidArgument("unknown URL scheme");
}

}  // namespace mf::transports
