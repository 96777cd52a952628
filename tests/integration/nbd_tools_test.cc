// nbd::Export against real NBD clients — libnbd's nbdinfo, nbdcopy and nbdsh, and fio's nbd
// engine — on a unix socket in a temp dir and on TCP 127.0.0.1 (ephemeral port), backed by
// a MemoryRemote and by a real memfabric TCP Remote (in-process fabric::Server on loopback).
#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <random>
#include <string>

#include "fabric/memory_remote.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"
#include "tests/integration/tcp_test_util.h"

namespace mf::nbd {
namespace {

using testing::RunTool;
using testing::TempDir;

constexpr uint64_t kSize = 64u << 20;
const std::string kScript = std::string(MF_SOURCE_DIR) + "/tests/integration/nbd_commands.py";

bool HaveTools() {
  std::string out;
  return RunTool("command -v nbdinfo && command -v nbdcopy && command -v nbdsh && command -v fio", &out) == 0;
}

// An Export with a writable and a read-only export, on a unix socket and on TCP.
class ExportHarness {
 public:
  void Start(fabric::Remote& rw, const std::string& rw_name, fabric::Remote& ro, const std::string& ro_name) {
    rw_name_ = rw_name;
    ro_name_ = ro_name;
    export_ = std::make_unique<Export>();
    ASSERT_TRUE(export_->Add({rw_name, "writable test export", &rw, false}).ok());
    ASSERT_TRUE(export_->Add({ro_name, "read-only test export", &ro, false}).ok());
    socket_ = (dir_.path() / "nbd.sock").string();
    ASSERT_TRUE(export_->ListenUnix(socket_).ok());
    auto port = export_->ListenTcp("127.0.0.1", 0);
    ASSERT_TRUE(port.ok()) << port.status().ToString();
    port_ = *port;
  }
  void Stop() {
    if (export_) export_->Stop();
  }
  std::string UnixUri(const std::string& name) const { return "nbd+unix:///" + name + "?socket=" + socket_; }
  std::string TcpUri(const std::string& name) const {
    return "nbd://127.0.0.1:" + std::to_string(port_) + "/" + name;
  }
  const std::string& rw() const { return rw_name_; }
  const std::string& ro() const { return ro_name_; }
  const TempDir& dir() const { return dir_; }
  Export& exporter() { return *export_; }

 private:
  TempDir dir_;
  std::unique_ptr<Export> export_;
  std::string socket_;
  uint16_t port_ = 0;
  std::string rw_name_, ro_name_;
};

// ---- The checks, shared by the backends ----------------------------------------------------------

void CheckNbdInfo(const ExportHarness& h, const std::string& uri, const std::string& ro_uri) {
  std::string out;
  ASSERT_EQ(RunTool("nbdinfo --json '" + uri + "'", &out), 0) << out;
  for (const char* want :
       {"\"export-size\": 67108864", "\"block_size_minimum\": 1", "\"block_size_preferred\": 4096",
        "\"block_size_maximum\": 33554432", "\"is_read_only\": false", "\"can_flush\": true",
        "\"can_fua\": true", "\"can_trim\": true", "\"can_zero\": true", "\"can_fast_zero\": true",
        "\"can_cache\": true", "\"can_multi_conn\": true", "\"can_df\": true", "\"structured\": true",
        "\"protocol\": \"newstyle-fixed\""}) {
    EXPECT_NE(out.find(want), std::string::npos) << want << " not in\n" << out;
  }
  EXPECT_NE(out.find("\"export-name\": \"" + h.rw() + "\""), std::string::npos) << out;
  ASSERT_EQ(RunTool("nbdinfo --json '" + ro_uri + "'", &out), 0) << out;
  EXPECT_NE(out.find("\"is_read_only\": true"), std::string::npos) << out;
  EXPECT_NE(out.find("\"can_trim\": false"), std::string::npos) << out;
  // --list shows both exports with their descriptions.
  ASSERT_EQ(RunTool("nbdinfo --list '" + uri + "'", &out), 0) << out;
  EXPECT_NE(out.find("export=\"" + h.rw() + "\""), std::string::npos) << out;
  EXPECT_NE(out.find("export=\"" + h.ro() + "\""), std::string::npos) << out;
  EXPECT_NE(out.find("read-only test export"), std::string::npos) << out;
  // --map asks for base:allocation: one allocated data extent over the whole export.
  ASSERT_EQ(RunTool("nbdinfo --map '" + uri + "'", &out), 0) << out;
  EXPECT_NE(out.find("67108864    0  data"), std::string::npos) << out;
  // --size of the default export ("" = the first one added).
  ASSERT_EQ(RunTool("nbdinfo --size '" + uri + "'", &out), 0) << out;
  EXPECT_NE(out.find("67108864"), std::string::npos) << out;
}

void WriteRandomFile(const std::string& path, uint64_t seed, bool zero_middle) {
  std::vector<char> data(24u << 20);
  std::mt19937_64 rng(seed);
  for (auto& c : data) c = static_cast<char>(rng());
  if (zero_middle) std::fill(data.begin() + (8u << 20), data.begin() + (16u << 20), '\0');
  std::ofstream f(path, std::ios::binary);
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
}

void CheckNbdCopy(const ExportHarness& h, const std::string& uri, uint64_t seed) {
  const std::string a = (h.dir().path() / "a.bin").string();
  const std::string b = (h.dir().path() / "b.bin").string();
  const std::string back = (h.dir().path() / "back.bin").string();
  WriteRandomFile(a, seed, false);
  WriteRandomFile(b, seed + 100, true);
  std::string out;
  const std::string n = std::to_string(24u << 20);
  ASSERT_EQ(RunTool("nbdcopy --flush '" + a + "' '" + uri + "'", &out), 0) << out;
  ASSERT_EQ(RunTool("nbdcopy '" + uri + "' '" + back + "'", &out), 0) << out;
  ASSERT_EQ(RunTool("cmp -n " + n + " '" + a + "' '" + back + "'", &out), 0) << out;
  ASSERT_EQ(RunTool("test $(stat -c %s '" + back + "') -eq " + std::to_string(kSize), &out), 0) << out;
  // Over it, a file with 8 MiB of zeroes in the middle: nbdcopy turns those into zero
  // requests, which must read back as zeroes.
  ASSERT_EQ(RunTool("nbdcopy --flush '" + b + "' '" + uri + "'", &out), 0) << out;
  ASSERT_EQ(RunTool("nbdcopy '" + uri + "' - | cmp -n " + n + " '" + b + "' -", &out), 0) << out;
}

void CheckNbdsh(const std::string& uri, const std::string& ro_uri) {
  std::string out;
  const std::string cmd = "NBD_URI='" + uri + "' NBD_RO_URI='" + ro_uri +
                          "' NBD_SIZE=" + std::to_string(kSize) + " timeout 300 nbdsh -n -c \"exec(open('" +
                          kScript + "').read())\"";
  ASSERT_EQ(RunTool(cmd, &out), 0) << out;
  EXPECT_NE(out.find("all checks passed"), std::string::npos) << out;
}

void CheckFio(const std::string& uri, int seconds) {
  std::string out;
  const std::string cmd =
      "timeout 120 fio --name=randrw --ioengine=nbd --uri='" + uri +
      "' --rw=randrw --bs=4k --iodepth=16 --numjobs=3 --size=8m --offset_increment=16m "
      "--verify=crc32c --verify_fatal=1 --verify_state_save=0 --group_reporting --runtime=" +
      std::to_string(seconds) + " 2>&1";
  ASSERT_EQ(RunTool(cmd, &out), 0) << out;
  EXPECT_NE(out.find("err= 0"), std::string::npos) << out;
  EXPECT_EQ(out.find("verify:"), std::string::npos) << out;  // how fio reports bad blocks
  // A second pass with large sequential requests and mixed sizes.
  const std::string seq = "timeout 120 fio --name=seqwrite --ioengine=nbd --uri='" + uri +
                          "' --rw=write --bsrange=4k-2m --iodepth=8 --size=32m --verify=crc32c "
                          "--verify_fatal=1 --verify_state_save=0 "
                          "2>&1";
  ASSERT_EQ(RunTool(seq, &out), 0) << out;
  EXPECT_NE(out.find("err= 0"), std::string::npos) << out;
}

// ---- Over a MemoryRemote -------------------------------------------------------------------------

class NbdToolsMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveTools()) GTEST_SKIP() << "libnbd-bin and fio are needed";
    region_ = std::make_shared<fabric::MemoryRegion>("disk", kSize);
    // A small max_transfer makes the Export split requests.
    remote_ = std::make_unique<fabric::MemoryRemote>(region_, true, 256u << 10);
    ro_remote_ = std::make_unique<fabric::MemoryRemote>(region_, false);
    harness_.Start(*remote_, "disk", *ro_remote_, "disk-ro");
  }
  void TearDown() override { harness_.Stop(); }

  std::shared_ptr<fabric::MemoryRegion> region_;
  std::unique_ptr<fabric::MemoryRemote> remote_;
  std::unique_ptr<fabric::MemoryRemote> ro_remote_;
  ExportHarness harness_;
};

TEST_F(NbdToolsMemoryTest, NbdInfoUnix) {
  CheckNbdInfo(harness_, harness_.UnixUri("disk"), harness_.UnixUri("disk-ro"));
}
TEST_F(NbdToolsMemoryTest, NbdInfoTcp) {
  CheckNbdInfo(harness_, harness_.TcpUri("disk"), harness_.TcpUri("disk-ro"));
}
TEST_F(NbdToolsMemoryTest, NbdCopyUnix) {
  CheckNbdCopy(harness_, harness_.UnixUri("disk"), 1);
}
TEST_F(NbdToolsMemoryTest, NbdCopyTcp) {
  CheckNbdCopy(harness_, harness_.TcpUri("disk"), 2);
}
TEST_F(NbdToolsMemoryTest, NbdshCommandsUnix) {
  CheckNbdsh(harness_.UnixUri("disk"), harness_.UnixUri("disk-ro"));
}
TEST_F(NbdToolsMemoryTest, NbdshCommandsTcp) {
  CheckNbdsh(harness_.TcpUri("disk"), harness_.TcpUri("disk-ro"));
}
TEST_F(NbdToolsMemoryTest, FioVerifyUnix) {
  CheckFio(harness_.UnixUri("disk"), 5);
}
TEST_F(NbdToolsMemoryTest, FioVerifyTcp) {
  CheckFio(harness_.TcpUri("disk"), 5);
}

// ---- Over a real memfabric TCP Remote ----------------------------------------------------------------

class NbdToolsFabricTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveTools()) GTEST_SKIP() << "libnbd-bin and fio are needed";
    server_ = tcp::testing::TestServer::Start();
    ASSERT_NE(server_, nullptr);
    auto client = transports::Connect(server_->url(), tcp::testing::ClientOpts());
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    client_ = std::move(client).value();
    ASSERT_TRUE(client_->Create({"vol", kSize, fabric::BackingKind::kAnonymous, ""}).ok());
    fabric::OpenOptions rw;
    rw.writable = true;
    rw.connections = 2;
    auto remote = client_->Open("vol", rw);
    ASSERT_TRUE(remote.ok()) << remote.status().ToString();
    remote_ = std::move(remote).value();
    auto ro = client_->Open("vol", fabric::OpenOptions{});
    ASSERT_TRUE(ro.ok()) << ro.status().ToString();
    ro_remote_ = std::move(ro).value();
    ASSERT_TRUE(remote_->writable());
    ASSERT_FALSE(ro_remote_->writable());
    harness_.Start(*remote_, "vol", *ro_remote_, "vol-ro");
  }
  void TearDown() override {
    harness_.Stop();
    if (remote_) (void)remote_->Close();
    if (ro_remote_) (void)ro_remote_->Close();
    if (server_) server_->Stop();
  }

  std::unique_ptr<tcp::testing::TestServer> server_;
  std::unique_ptr<fabric::Client> client_;
  std::unique_ptr<fabric::Remote> remote_;
  std::unique_ptr<fabric::Remote> ro_remote_;
  ExportHarness harness_;
};

TEST_F(NbdToolsFabricTest, NbdInfo) {
  CheckNbdInfo(harness_, harness_.UnixUri("vol"), harness_.TcpUri("vol-ro"));
}
TEST_F(NbdToolsFabricTest, NbdCopyUnix) {
  CheckNbdCopy(harness_, harness_.UnixUri("vol"), 3);
}
TEST_F(NbdToolsFabricTest, NbdCopyTcp) {
  CheckNbdCopy(harness_, harness_.TcpUri("vol"), 4);
}
TEST_F(NbdToolsFabricTest, NbdshCommands) {
  CheckNbdsh(harness_.UnixUri("vol"), harness_.TcpUri("vol-ro"));
}
TEST_F(NbdToolsFabricTest, FioVerify) {
  CheckFio(harness_.TcpUri("vol"), 4);
}

}  // namespace
}  // namespace mf::nbd
