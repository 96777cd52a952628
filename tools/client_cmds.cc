// memfabric ls / create / rm / stat / read / write: the client's control-plane commands
// and simple byte I/O between stdin/stdout and a region.
#include <fmt/core.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include "fabric/client.h"
#include "fabric/os.h"
#include "fabric/region.h"
#include "fabric/remote.h"
#include "tools/cli_common.h"

namespace mf::cli {
namespace {

// read/write move data through memory in pieces of this size, with kStreamDepth
// requests in flight.
constexpr size_t kStreamChunk = 8u << 20;
constexpr size_t kStreamDepth = 8;
static_assert(kStreamChunk % kPageSize == 0);

std::string ServerOf(const fabric::Url& url) {
  fabric::Url server = url;
  server.region.clear();
  return server.ToString();
}

// ---- ls ----------------------------------------------------------------------------

int RunLs(const TargetFlags& flags) {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient("ls", flags.url, /*need_region=*/false, flags.client, &url, &client);
      rc != kExitOk) {
    return rc;
  }
  Result<std::vector<fabric::RegionInfo>> regions = client->List();
  if (!regions.ok()) return Report("ls", regions.status(), HintFor(regions.status(), url, flags.client));
  if (regions->empty()) {
    std::fprintf(stderr,
                 "memfabric ls: %s has no regions; add one with `memfabric create %s/NAME --size SIZE`\n",
                 url.ToString().c_str(), url.ToString().c_str());
    return kExitOk;
  }
  size_t width = 4;  // "NAME"
  for (const fabric::RegionInfo& r : *regions) width = std::max(width, r.name.size());
  fmt::print("{:<{}}  {:>10}  {:>14}  {:<7}  {:>10}  {}\n", "NAME", width, "SIZE", "BYTES", "BACKING",
             "GENERATION", "WRITER");
  for (const fabric::RegionInfo& r : *regions) {
    fmt::print("{:<{}}  {:>10}  {:>14}  {:<7}  {:>10}  {}\n", r.name, width, fabric::FormatSize(r.size),
               r.size, fabric::BackingName(r.backing), r.generation, r.has_writer ? "yes" : "-");
  }
  return kExitOk;
}

// ---- create ------------------------------------------------------------------------

struct CreateFlags {
  TargetFlags target;
  std::string size;
  std::string backing = "anon";
};

int RunCreate(const CreateFlags& flags) {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient("create", flags.target.url, true, flags.target.client, &url, &client);
      rc != kExitOk) {
    return rc;
  }
  // One grammar for --region of serve and for create: reuse its parser.
  Result<fabric::RegionSpec> spec =
      fabric::ParseRegionSpec(url.region + "=" + flags.size + ",backing=" + flags.backing);
  if (!spec.ok()) {
    return Report(
        "create", spec.status(),
        "e.g. --size 64M, --size 1G; --backing anon, memfd, hugetlb or file:PATH (a path on the server)");
  }
  Result<fabric::RegionInfo> info = client->Create(*spec);
  if (!info.ok()) return Report("create", info.status(), HintFor(info.status(), url, flags.target.client));
  fmt::print("created {}: {}, backing {}, generation {}\n", url.ToString(), fabric::FormatSize(info->size),
             fabric::BackingName(info->backing), info->generation);
  return kExitOk;
}

// ---- rm ----------------------------------------------------------------------------

int RunRm(const TargetFlags& flags) {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient("rm", flags.url, true, flags.client, &url, &client); rc != kExitOk) return rc;
  Status deleted = client->Delete(url.region);
  if (!deleted.ok()) {
    std::string hint = HintFor(deleted, url, flags.client);
    if (deleted.code() == Code::kBusy) {
      hint = "a writer has '" + url.region + "' open; rm works once it closes it";
    } else if (deleted.code() == Code::kNotFound) {
      hint = "list the regions with `memfabric ls " + ServerOf(url) + "`";
    }
    return Report("rm", deleted, hint);
  }
  fmt::print("removed {}\n", url.ToString());
  return kExitOk;
}

// ---- stat --------------------------------------------------------------------------

int RunStat(const TargetFlags& flags) {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient("stat", flags.url, true, flags.client, &url, &client); rc != kExitOk) return rc;
  Result<fabric::RegionInfo> info = client->Stat(url.region);
  if (!info.ok()) return Report("stat", info.status(), HintFor(info.status(), url, flags.client));
  fmt::print("name:       {}\n", info->name);
  fmt::print("size:       {} ({} bytes)\n", fabric::FormatSize(info->size), info->size);
  fmt::print("backing:    {}\n", fabric::BackingName(info->backing));
  fmt::print("generation: {}\n", info->generation);
  fmt::print("writer:     {}\n", info->has_writer ? "yes (the write lease is held)" : "none");
  fmt::print("server:     {}\n", ServerOf(url));
  fmt::print("transport:  {}\n", client->transport());
  return kExitOk;
}

// ---- read / write ------------------------------------------------------------------

struct IoFlags {
  TargetFlags target;
  std::string offset;
  std::string length;
  bool force = false;
  bool quiet = false;
};

// Opens url.region; reports and returns null on failure (exit code in *rc).
std::unique_ptr<fabric::Remote> OpenOrReport(std::string_view command, fabric::Client& client,
                                             const fabric::Url& url, const ClientFlags& flags, bool writable,
                                             int* rc) {
  fabric::OpenOptions options;
  options.writable = writable;
  Result<std::unique_ptr<fabric::Remote>> remote = client.Open(url.region, options);
  if (!remote.ok()) {
    *rc = Report(command, remote.status().WithContext("opening " + url.region),
                 HintFor(remote.status(), url, flags));
    return nullptr;
  }
  return std::move(remote).value();
}

int RunRead(const IoFlags& flags) {
  constexpr char kCmd[] = "read";
  if (::isatty(STDOUT_FILENO) && !flags.force) {
    return Report(kCmd, InvalidArgument("refusing to write binary data to a terminal"),
                  "redirect stdout (`> file` or `| xxd`), or pass --force");
  }
  Result<uint64_t> offset = ParseByteCount("OFFSET", flags.offset);
  if (!offset.ok()) return Report(kCmd, offset.status());
  Result<uint64_t> length = ParseByteCount("LEN", flags.length);
  if (!length.ok()) return Report(kCmd, length.status());

  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient(kCmd, flags.target.url, true, flags.target.client, &url, &client); rc != kExitOk) {
    return rc;
  }
  int rc = kExitOk;
  std::unique_ptr<fabric::Remote> remote = OpenOrReport(kCmd, *client, url, flags.target.client, false, &rc);
  if (!remote) return rc;
  Status range = fabric::CheckRange(*offset, *length, remote->size());
  if (!range.ok()) {
    return Report(kCmd, InvalidArgument(std::string(range.message())),
                  "the region holds " + fabric::FormatSize(remote->size()) + " (" +
                      std::to_string(remote->size()) + " bytes); choose OFFSET + LEN within it");
  }
  std::vector<std::byte> chunk(static_cast<size_t>(std::min<uint64_t>(*length, kStreamChunk)));
  for (uint64_t done = 0; done < *length;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(*length - done, chunk.size()));
    std::span<std::byte> piece(chunk.data(), n);
    Status read = fabric::ReadAt(*remote, *offset + done, piece, kStreamDepth);
    if (!read.ok())
      return Report(kCmd, read.WithContext("reading " + url.region), HintFor(read, url, flags.target.client));
    Status written = WriteAll(STDOUT_FILENO, piece);
    if (!written.ok()) return Report(kCmd, written.WithContext("writing to stdout"));
    done += n;
  }
  Status closed = remote->Close();
  if (!closed.ok()) return Report(kCmd, closed.WithContext("closing " + url.region));
  return kExitOk;
}

// Reads up to buf.size() bytes from fd, fewer only at EOF. Returns the count.
Result<size_t> ReadUpTo(int fd, std::span<std::byte> buf) {
  size_t got = 0;
  while (got < buf.size()) {
    const ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "reading stdin");
    }
    got += static_cast<size_t>(n);
  }
  return got;
}

int RunWrite(const IoFlags& flags) {
  constexpr char kCmd[] = "write";
  if (::isatty(STDIN_FILENO) && !flags.force) {
    return Report(kCmd, InvalidArgument("stdin is a terminal; write reads the bytes to store from stdin"),
                  "redirect a file (`< file`) or a pipe into it, or pass --force to type them");
  }
  Result<uint64_t> offset = ParseByteCount("OFFSET", flags.offset);
  if (!offset.ok()) return Report(kCmd, offset.status());

  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient(kCmd, flags.target.url, true, flags.target.client, &url, &client); rc != kExitOk) {
    return rc;
  }
  int rc = kExitOk;
  std::unique_ptr<fabric::Remote> remote = OpenOrReport(kCmd, *client, url, flags.target.client, true, &rc);
  if (!remote) return rc;
  const std::string fit_hint = "the region holds " + fabric::FormatSize(remote->size()) + " (" +
                               std::to_string(remote->size()) +
                               " bytes); write less, at a lower OFFSET, or " + "into a larger region";
  // A regular file's size is known: refuse before writing anything.
  struct stat st {};
  if (::fstat(STDIN_FILENO, &st) == 0 && S_ISREG(st.st_mode)) {
    const off_t position = ::lseek(STDIN_FILENO, 0, SEEK_CUR);
    const uint64_t remaining = static_cast<uint64_t>(st.st_size - std::max<off_t>(position, 0));
    Status range = fabric::CheckRange(*offset, remaining, remote->size());
    if (!range.ok()) {
      return Report(kCmd,
                    InvalidArgument("the input (" + std::to_string(remaining) + " bytes at offset " +
                                    std::to_string(*offset) + ") does not fit the region"),
                    fit_hint);
    }
  }
  std::vector<std::byte> chunk(kStreamChunk);
  uint64_t done = 0;
  for (;;) {
    Result<size_t> got = ReadUpTo(STDIN_FILENO, chunk);
    if (!got.ok()) return Report(kCmd, got.status());
    if (*got == 0) break;
    Status range = fabric::CheckRange(*offset + done, *got, remote->size());
    if (!range.ok()) {
      return Report(kCmd,
                    InvalidArgument("the input does not fit the region: " + std::to_string(done) +
                                    " bytes were written before its end"),
                    fit_hint);
    }
    Status written = fabric::WriteAt(*remote, *offset + done, std::span<const std::byte>(chunk.data(), *got),
                                     kStreamDepth);
    if (!written.ok()) {
      return Report(kCmd, written.WithContext("writing " + url.region),
                    HintFor(written, url, flags.target.client));
    }
    done += *got;
  }
  Status flushed = remote->Flush();
  if (!flushed.ok()) return Report(kCmd, flushed.WithContext("flushing " + url.region));
  Status closed = remote->Close();
  if (!closed.ok()) return Report(kCmd, closed.WithContext("closing " + url.region));
  if (!flags.quiet) {
    std::fprintf(stderr, "memfabric write: wrote %s (%llu bytes) to %s at offset %llu\n",
                 fabric::FormatSize(done).c_str(), static_cast<unsigned long long>(done),
                 url.ToString().c_str(), static_cast<unsigned long long>(*offset));
  }
  return kExitOk;
}

// ---- registration ------------------------------------------------------------------

void AddUrl(CLI::App& sub, std::string& url, const char* what) {
  sub.add_option("URL", url, what)->required();
}

}  // namespace

void AddClientCommands(CLI::App& app, std::vector<Command>& commands) {
  {
    auto flags = std::make_shared<TargetFlags>();
    CLI::App* sub = app.add_subcommand("ls", "List a server's regions");
    sub->footer(R"(Examples:
  MEMFABRIC_SECRET=... memfabric ls tcp://10.0.0.5:7411
  memfabric ls auto://127.0.0.1:7411 --secret-file /root/mf.secret
  memfabric ls tls://pool.example:7411 --tls-ca ca.pem --secret-file s
Columns: NAME, SIZE, BYTES, BACKING, GENERATION (changes when re-created), WRITER (lease held).)");
    AddUrl(*sub, flags->url, "Server: tcp://HOST[:PORT], tls://, rdma:// or auto://");
    AddClientFlags(*sub, flags->client);
    commands.push_back({sub, [flags] { return RunLs(*flags); }});
  }
  {
    auto flags = std::make_shared<CreateFlags>();
    CLI::App* sub = app.add_subcommand("create", "Create a region on a server");
    sub->footer(R"(Examples:
  memfabric create tcp://127.0.0.1:7411/cache --size 1G
  memfabric create tcp://127.0.0.1:7411/swap --size 4G --backing memfd
  memfabric create tcp://127.0.0.1:7411/state --size 256M --backing file:/var/lib/mf/state
A file: path is on the server's file system; its data survives a server restart.)");
    AddUrl(*sub, flags->target.url, "The region to create: SCHEME://HOST[:PORT]/NAME");
    sub->add_option("--size", flags->size, "Size in bytes; K/M/G/T suffixes (powers of 1024)")->required();
    sub->add_option("--backing", flags->backing, "anon, memfd, hugetlb or file:PATH")->capture_default_str();
    AddClientFlags(*sub, flags->target.client);
    commands.push_back({sub, [flags] { return RunCreate(*flags); }});
  }
  {
    auto flags = std::make_shared<TargetFlags>();
    CLI::App* sub =
        app.add_subcommand("rm", "Delete a region (open handles keep its memory until they close)");
    sub->footer(R"(Example:
  memfabric rm tcp://127.0.0.1:7411/cache)");
    AddUrl(*sub, flags->url, "The region: SCHEME://HOST[:PORT]/NAME");
    AddClientFlags(*sub, flags->client);
    commands.push_back({sub, [flags] { return RunRm(*flags); }});
  }
  {
    auto flags = std::make_shared<TargetFlags>();
    CLI::App* sub = app.add_subcommand("stat", "Show a region's size, backing, generation and writer");
    sub->footer(R"(Example:
  memfabric stat tcp://127.0.0.1:7411/cache)");
    AddUrl(*sub, flags->url, "The region: SCHEME://HOST[:PORT]/NAME");
    AddClientFlags(*sub, flags->client);
    commands.push_back({sub, [flags] { return RunStat(*flags); }});
  }
  {
    auto flags = std::make_shared<IoFlags>();
    CLI::App* sub = app.add_subcommand("read", "Copy LEN bytes at OFFSET of a region to stdout");
    sub->footer(R"(Examples:
  memfabric read tcp://127.0.0.1:7411/cache 0 4K > first-page.bin
  memfabric read tcp://127.0.0.1:7411/cache 1M 64 | xxd
OFFSET and LEN take K/M/G suffixes. Binary output to a terminal needs --force.)");
    AddUrl(*sub, flags->target.url, "The region: SCHEME://HOST[:PORT]/NAME");
    sub->add_option("OFFSET", flags->offset, "Byte offset in the region (K/M/G suffixes)")->required();
    sub->add_option("LEN", flags->length, "Number of bytes (K/M/G suffixes)")->required();
    sub->add_flag("--force", flags->force, "Write binary data even when stdout is a terminal");
    AddClientFlags(*sub, flags->target.client);
    commands.push_back({sub, [flags] { return RunRead(*flags); }});
  }
  {
    auto flags = std::make_shared<IoFlags>();
    CLI::App* sub =
        app.add_subcommand("write", "Copy stdin (to EOF) into a region at OFFSET (takes the write lease)");
    sub->footer(R"(Examples:
  memfabric write tcp://127.0.0.1:7411/cache 0 < disk.img
  head -c 1M /dev/urandom | memfabric write tcp://127.0.0.1:7411/cache 64M
The data is flushed on the server before the command returns. OFFSET takes K/M/G suffixes.)");
    AddUrl(*sub, flags->target.url, "The region: SCHEME://HOST[:PORT]/NAME");
    sub->add_option("OFFSET", flags->offset, "Byte offset in the region (K/M/G suffixes)")->required();
    sub->add_flag("--force", flags->force, "Read stdin even when it is a terminal");
    sub->add_flag("-q,--quiet", flags->quiet, "Do not print the summary line on stderr");
    AddClientFlags(*sub, flags->target.client);
    commands.push_back({sub, [flags] { return RunWrite(*flags); }});
  }
}

}  // namespace mf::cli
