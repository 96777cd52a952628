#include "transports/connect.h"

#include <spdlog/spdlog.h>

#include "transports/rdma/rdma_client.h"
#include "transports/rdma/verbs.h"
#include "transports/tcp/tcp_client.h"

namespace mf::transports {
namespace {

Result<std::unique_ptr<fabric::Client>> ConnectTcp(const fabric::Url& url, const ClientOptions& options) {
  MF_ASSIGN_OR_RETURN(auto client, tcp::TcpClient::Connect(url, options, url.scheme == fabric::Scheme::kTls));
  return std::unique_ptr<fabric::Client>(std::move(client));
}

}  // namespace

Result<std::unique_ptr<fabric::Client>> Connect(const fabric::Url& url, const ClientOptions& options) {
  switch (url.scheme) {
    case fabric::Scheme::kTcp:
    case fabric::Scheme::kTls: return ConnectTcp(url, options);
    case fabric::Scheme::kRdma: {
      MF_ASSIGN_OR_RETURN(auto client, rdma::RdmaClient::Connect(url, options, false));
      return std::unique_ptr<fabric::Client>(std::move(client));
    }
    case fabric::Scheme::kAuto: {
      fabric::Url tcp_url = url;
      tcp_url.scheme = fabric::Scheme::kTcp;
      if (!rdma::HasRdmaDevice()) {
        spdlog::info("{}: using TCP: this system has no RDMA device", url.ToString());
        return ConnectTcp(tcp_url, options);
      }
      // RDMA for the data plane when the server offers it and the queue pairs connect;
      // RdmaClient::Open falls back to TCP otherwise and logs why.
      spdlog::info("{}: RDMA device present; trying RDMA for the data plane", url.ToString());
      MF_ASSIGN_OR_RETURN(auto client, rdma::RdmaClient::Connect(url, options, true));
      return std::unique_ptr<fabric::Client>(std::move(client));
    }
  }
  return InvalidArgument("unknown URL scheme");
}

}  // namespace mf::transports
