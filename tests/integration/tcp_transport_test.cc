// End-to-end tests of the TCP transport over loopback: control plane, data plane under
// concurrency, write leases, file-backed regions across a server restart, failure
// detection and URL schemes.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <thread>

#include "fabric/remote.h"
#include "tests/integration/tcp_test_util.h"
#include "transports/connect.h"

namespace mf::tcp::testing {
namespace {

using fabric::IoKind;
using fabric::IoRequest;

constexpr uint64_t kMiB = 1u << 20;

std::unique_ptr<fabric::Client> MustConnect(const TestServer& s, transports::ClientOptions o = ClientOpts()) {
  auto c = transports::Connect(s.url(), o);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? std::move(c).value() : nullptr;
}

fabric::RegionSpec Spec(std::string name, uint64_t size) {
  fabric::RegionSpec spec;
  spec.name = std::move(name);
  spec.size = size;
  return spec;
}

TEST(TcpTransport, ControlPlane) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->transport(), "tcp");

  MF_ASSERT_OK_AND_ASSIGN(auto empty, client->List());
  EXPECT_TRUE(empty.empty());
  MF_ASSERT_OK_AND_ASSIGN(auto created, client->Create(Spec("alpha", 4 * kMiB)));
  EXPECT_EQ(created.name, "alpha");
  EXPECT_EQ(created.size, 4 * kMiB);
  MF_ASSERT_OK_AND_ASSIGN(auto beta, client->Create(Spec("beta", 64 * 1024)));
  EXPECT_NE(beta.generation, created.generation);

  auto dup = client->Create(Spec("alpha", kMiB));
  EXPECT_EQ(dup.status().code(), Code::kAlreadyExists) << dup.status().ToString();

  MF_ASSERT_OK_AND_ASSIGN(auto stat, client->Stat("alpha"));
  EXPECT_EQ(stat.size, 4 * kMiB);
  EXPECT_EQ(stat.generation, created.generation);
  EXPECT_FALSE(stat.has_writer);

  MF_ASSERT_OK_AND_ASSIGN(auto list, client->List());
  ASSERT_EQ(list.size(), 2u);

  MF_ASSERT_OK(client->Delete("alpha"));
  EXPECT_EQ(client->Stat("alpha").status().code(), Code::kNotFound);
  EXPECT_EQ(client->Delete("alpha").code(), Code::kNotFound);
  EXPECT_EQ(client->Open("alpha", {}).status().code(), Code::kNotFound);
  MF_ASSERT_OK_AND_ASSIGN(list, client->List());
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].name, "beta");

  // Bad names are refused by the server, not crash it.
  EXPECT_FALSE(client->Create(Spec("../etc", kMiB)).ok());
  EXPECT_FALSE(client->Create(Spec("zero", 0)).ok());
}

TEST(TcpTransport, ReadWriteRoundTrip) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  constexpr uint64_t kSize = 8 * kMiB + 4096;
  MF_ASSERT_OK(client->Create(Spec("rw", kSize)).status());
  fabric::OpenOptions oo;
  oo.writable = true;
  oo.connections = 3;
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("rw", oo));
  EXPECT_TRUE(remote->writable());
  EXPECT_EQ(remote->size(), kSize);
  EXPECT_EQ(remote->transport(), "tcp");
  EXPECT_EQ(remote->max_transfer(), wire::kMaxPayload);

  std::vector<std::byte> data(kSize);
  FillPattern(data, 1);
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
  std::vector<std::byte> back(kSize);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, back));
  EXPECT_TRUE(back == data);

  // Odd offsets and lengths, including the very last byte.
  for (uint64_t off : {uint64_t{1}, uint64_t{4095}, kMiB - 3, kSize - 1}) {
    size_t len = static_cast<size_t>(std::min<uint64_t>(kSize - off, 3 * kMiB + 17));
    std::vector<std::byte> chunk(len);
    FillPattern(chunk, off);
    MF_ASSERT_OK(fabric::WriteAt(*remote, off, chunk));
    std::copy(chunk.begin(), chunk.end(), data.begin() + static_cast<ptrdiff_t>(off));
    std::vector<std::byte> got(len);
    MF_ASSERT_OK(fabric::ReadAt(*remote, off, got));
    EXPECT_TRUE(got == chunk) << "offset " << off;
  }
  MF_ASSERT_OK(remote->Flush());
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, back));
  EXPECT_TRUE(back == data);

  // A second client sees the same bytes.
  auto reader_client = MustConnect(*s);
  MF_ASSERT_OK_AND_ASSIGN(auto reader, reader_client->Open("rw", {}));
  EXPECT_FALSE(reader->writable());
  std::vector<std::byte> seen(kSize);
  MF_ASSERT_OK(fabric::ReadAt(*reader, 0, seen));
  EXPECT_TRUE(seen == data);
  MF_ASSERT_OK(reader->Close());
  MF_ASSERT_OK(remote->Close());
  MF_ASSERT_OK(remote->Close());  // idempotent
}

// Counts completions and checks exactly-once per cookie.
class Tracker final : public fabric::IoCallback {
 public:
  explicit Tracker(size_t n) : seen_(n) {}
  void OnIoComplete(uint64_t cookie, const Status& status) override {
    if (cookie < seen_.size()) seen_[cookie].fetch_add(1);
    if (!status.ok()) errors_.fetch_add(1);
    if (!status.ok() && status.code() != Code::kAborted && status.code() != Code::kUnavailable &&
        status.code() != Code::kTimeout) {
      unexpected_.fetch_add(1);
    }
    done_.fetch_add(1);
  }
  bool WaitAll(size_t n, std::chrono::milliseconds timeout) {
    auto deadline = Clock::now() + timeout;
    while (done_.load() < n && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    return done_.load() >= n;
  }
  bool ExactlyOnce() const {
    for (const auto& s : seen_) {
      if (s.load() != 1) return false;
    }
    return true;
  }
  size_t errors() const { return errors_.load(); }
  size_t unexpected() const { return unexpected_.load(); }

 private:
  std::vector<std::atomic<int>> seen_;
  std::atomic<size_t> done_{0};
  std::atomic<size_t> errors_{0};
  std::atomic<size_t> unexpected_{0};
};

// Each thread owns a stripe of a shared region (through one shared writable Remote) and a
// region of its own (through its own client); it issues batches of random reads and writes
// and checks every read against its reference copy.
TEST(TcpTransport, ConcurrentRandomIo) {
  ListenOptions lo;
  lo.threads = 2;
  auto s = TestServer::Start(lo);
  ASSERT_NE(s, nullptr);
  constexpr int kThreads = 4;
  constexpr uint64_t kStripe = 3 * kMiB;
  constexpr int kRounds = 40;
  constexpr int kBatch = 8;
  auto admin = MustConnect(*s);
  ASSERT_NE(admin, nullptr);
  MF_ASSERT_OK(admin->Create(Spec("shared", kStripe * kThreads)).status());
  fabric::OpenOptions oo;
  oo.writable = true;
  oo.connections = 4;
  oo.queue_depth = 4;  // small: Submit must block and recover
  MF_ASSERT_OK_AND_ASSIGN(auto shared, admin->Open("shared", oo));

  std::atomic<int> failures{0};
  auto worker = [&](int t) {
    auto client = MustConnect(*s);
    if (!client) return failures.fetch_add(1), void();
    std::string own_name = "own" + std::to_string(t);
    if (!client->Create(Spec(own_name, kStripe)).ok()) return failures.fetch_add(1), void();
    fabric::OpenOptions own_oo;
    own_oo.writable = true;
    own_oo.connections = 2;
    auto own = client->Open(own_name, own_oo);
    if (!own.ok()) return failures.fetch_add(1), void();

    struct Target {
      fabric::Remote* remote;
      uint64_t base;
      std::vector<std::byte> ref;
    };
    std::vector<Target> targets;
    targets.push_back({shared.get(), kStripe * static_cast<uint64_t>(t), std::vector<std::byte>(kStripe)});
    targets.push_back({own->get(), 0, std::vector<std::byte>(kStripe)});
    std::mt19937_64 rng(static_cast<uint64_t>(t) * 7919);
    const uint64_t slice = kStripe / kBatch;
    for (int round = 0; round < kRounds; ++round) {
      Target& tgt = targets[static_cast<size_t>(round) % targets.size()];
      auto buffer = tgt.remote->AllocateBuffer(kBatch * slice);
      if (!buffer.ok()) return failures.fetch_add(1), void();
      std::vector<IoRequest> reqs;
      std::vector<std::pair<uint64_t, size_t>> ranges;  // region offset, length
      fabric::IoBatch batch(kBatch);
      for (int i = 0; i < kBatch; ++i) {
        uint64_t len = 1 + rng() % std::min<uint64_t>(slice, wire::kMaxPayload);
        uint64_t within = rng() % (slice - len + 1);
        uint64_t off = static_cast<uint64_t>(i) * slice + within;
        IoRequest r;
        r.kind = (rng() % 2 == 0) ? IoKind::kRead : IoKind::kWrite;
        r.offset = tgt.base + off;
        r.data = buffer->span().subspan(static_cast<size_t>(i) * slice, len);
        r.buffer = &*buffer;
        r.callback = &batch;
        r.cookie = static_cast<uint64_t>(i);
        if (r.kind == IoKind::kWrite) FillPattern(r.data, rng());
        reqs.push_back(r);
        ranges.emplace_back(off, len);
      }
      tgt.remote->Submit(reqs);
      Status st = batch.Wait();
      if (!st.ok()) {
        ADD_FAILURE() << st.ToString();
        return failures.fetch_add(1), void();
      }
      for (size_t i = 0; i < reqs.size(); ++i) {
        auto [off, len] = ranges[i];
        auto ref = std::span(tgt.ref).subspan(off, len);
        if (reqs[i].kind == IoKind::kWrite) {
          std::copy(reqs[i].data.begin(), reqs[i].data.end(), ref.begin());
        } else if (!std::equal(ref.begin(), ref.end(), reqs[i].data.begin())) {
          ADD_FAILURE() << "thread " << t << " read mismatch at " << off;
          failures.fetch_add(1);
        }
      }
    }
    // Final full comparison.
    for (auto& tgt : targets) {
      std::vector<std::byte> all(kStripe);
      if (!fabric::ReadAt(*tgt.remote, tgt.base, all).ok() || all != tgt.ref) failures.fetch_add(1);
    }
    if (!(*own)->Close().ok()) failures.fetch_add(1);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  MF_ASSERT_OK(shared->Close());
}

TEST(TcpTransport, WriteLease) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto a = MustConnect(*s);
  auto b = MustConnect(*s);
  ASSERT_TRUE(a && b);
  MF_ASSERT_OK(a->Create(Spec("leased", kMiB)).status());
  fabric::OpenOptions writable;
  writable.writable = true;
  MF_ASSERT_OK_AND_ASSIGN(auto writer, a->Open("leased", writable));
  MF_ASSERT_OK_AND_ASSIGN(auto stat, b->Stat("leased"));
  EXPECT_TRUE(stat.has_writer);

  auto second = b->Open("leased", writable);
  EXPECT_EQ(second.status().code(), Code::kBusy) << second.status().ToString();
  EXPECT_EQ(b->Delete("leased").code(), Code::kBusy);

  // Readers are fine, but cannot write.
  MF_ASSERT_OK_AND_ASSIGN(auto reader, b->Open("leased", {}));
  EXPECT_FALSE(reader->writable());
  std::vector<std::byte> bytes(100, std::byte{7});
  EXPECT_EQ(fabric::WriteAt(*reader, 0, bytes).code(), Code::kPermissionDenied);

  MF_ASSERT_OK(writer->Close());
  MF_ASSERT_OK_AND_ASSIGN(auto writer2, b->Open("leased", writable));
  MF_ASSERT_OK(fabric::WriteAt(*writer2, 10, bytes));
  std::vector<std::byte> got(100);
  MF_ASSERT_OK(fabric::ReadAt(*reader, 10, got));
  EXPECT_TRUE(got == bytes);

  // Dropping the remote without Close() also hands the lease back.
  writer2.reset();
  MF_ASSERT_OK_AND_ASSIGN(auto writer3, a->Open("leased", writable));
  MF_ASSERT_OK(writer3->Close());
}

TEST(TcpTransport, InvalidRequestsCompleteInline) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  constexpr uint64_t kSize = 64 * 1024;
  MF_ASSERT_OK(client->Create(Spec("small", kSize)).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("small", {}));
  MF_ASSERT_OK_AND_ASSIGN(auto buffer, remote->AllocateBuffer(2 * wire::kMaxPayload));
  MF_ASSERT_OK_AND_ASSIGN(auto other, remote->AllocateBuffer(4096));

  struct Case {
    uint64_t offset;
    std::span<std::byte> data;
    IoKind kind;
    Code want;
  };
  std::vector<Case> cases = {
      {kSize, buffer.span().first(1), IoKind::kRead, Code::kOutOfRange},
      {kSize - 10, buffer.span().first(11), IoKind::kRead, Code::kOutOfRange},
      {UINT64_MAX - 5, buffer.span().first(100), IoKind::kRead, Code::kOutOfRange},
      {0, buffer.span().first(0), IoKind::kRead, Code::kInvalidArgument},
      {0, buffer.span().first(wire::kMaxPayload + 1), IoKind::kRead, Code::kInvalidArgument},
      {0, other.span().first(10), IoKind::kRead, Code::kInvalidArgument},  // not in `buffer`
      {0, buffer.span().first(10), IoKind::kWrite, Code::kPermissionDenied},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    fabric::IoBatch batch(1);
    IoRequest r;
    r.kind = cases[i].kind;
    r.offset = cases[i].offset;
    r.data = cases[i].data;
    r.buffer = &buffer;
    r.callback = &batch;
    remote->Submit(std::span(&r, 1));
    EXPECT_EQ(batch.Wait().code(), cases[i].want) << "case " << i;
  }
  MF_ASSERT_OK(remote->Close());
  // After Close every request is aborted.
  fabric::IoBatch batch(1);
  IoRequest r;
  r.data = buffer.span().first(10);
  r.buffer = &buffer;
  r.callback = &batch;
  remote->Submit(std::span(&r, 1));
  EXPECT_EQ(batch.Wait().code(), Code::kAborted);
}

TEST(TcpTransport, CloseCompletesEveryRequestOnce) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  MF_ASSERT_OK(client->Create(Spec("busy", 16 * kMiB)).status());
  fabric::OpenOptions oo;
  oo.connections = 2;
  oo.queue_depth = 512;
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("busy", oo));
  constexpr size_t kRequests = 512;
  MF_ASSERT_OK_AND_ASSIGN(auto buffer, remote->AllocateBuffer(16 * kMiB));
  Tracker tracker(kRequests);
  std::vector<IoRequest> reqs(kRequests);
  for (size_t i = 0; i < kRequests; ++i) {
    reqs[i].offset = (i % 16) * kMiB;
    reqs[i].data = buffer.span().subspan((i % 16) * kMiB, kMiB);
    reqs[i].buffer = &buffer;
    reqs[i].callback = &tracker;
    reqs[i].cookie = i;
  }
  std::thread submitter([&] { remote->Submit(reqs); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  MF_ASSERT_OK(remote->Close());
  submitter.join();
  ASSERT_TRUE(tracker.WaitAll(kRequests, std::chrono::seconds(10)));
  EXPECT_TRUE(tracker.ExactlyOnce());
  EXPECT_EQ(tracker.unexpected(), 0u);
}

TEST(TcpTransport, FileBackedRegionSurvivesRestart) {
  TempDir dir;
  fabric::RegionSpec spec = Spec("persist", 2 * kMiB);
  spec.backing = fabric::BackingKind::kFile;
  spec.path = "persist.img";  // relative to the server's store
  fabric::ServerOptions with_store = mf::tcp::testing::SecureOptions();
  with_store.store_dir = dir.path().string();
  std::vector<std::byte> data(2 * kMiB);
  FillPattern(data, 42);
  {
    auto s = TestServer::Start({}, with_store);
    ASSERT_NE(s, nullptr);
    auto client = MustConnect(*s);
    ASSERT_NE(client, nullptr);
    // A client may not name a file outside the store.
    fabric::RegionSpec outside = spec;
    outside.name = "outside";
    outside.path = (dir.path() / "outside.img").string();
    EXPECT_EQ(client->Create(outside).status().code(), Code::kPermissionDenied);
    EXPECT_FALSE(std::filesystem::exists(dir.path() / "outside.img"));
    MF_ASSERT_OK_AND_ASSIGN(auto info, client->Create(spec));
    EXPECT_EQ(info.backing, fabric::BackingKind::kFile);
    fabric::OpenOptions oo;
    oo.writable = true;
    MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("persist", oo));
    MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
    MF_ASSERT_OK(remote->Flush());
    MF_ASSERT_OK(remote->Close());
    s->Stop();
  }
  auto s = TestServer::Start({}, with_store);
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  MF_ASSERT_OK(client->Create(spec).status());
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "persist.img"));
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("persist", {}));
  std::vector<std::byte> back(2 * kMiB);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, back));
  EXPECT_TRUE(back == data);
}

TEST(TcpTransport, DeadServerSurfacesAsError) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto opts = ClientOpts();
  opts.io_timeout = std::chrono::milliseconds(2000);
  auto client = MustConnect(*s, opts);
  ASSERT_NE(client, nullptr);
  MF_ASSERT_OK(client->Create(Spec("doomed", kMiB)).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("doomed", {}));
  std::vector<std::byte> buf(4096);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, buf));

  s->Stop();
  auto start = Clock::now();
  Status st = fabric::ReadAt(*remote, 0, buf);
  EXPECT_FALSE(st.ok());
  EXPECT_LT(Clock::now() - start, opts.io_timeout + std::chrono::seconds(1)) << st.ToString();
  EXPECT_FALSE(client->List().ok());
  EXPECT_FALSE(remote->Flush().ok());
}

// A listener that accepts and then never answers: connecting fails within the connect
// timeout, and a data request to a server that stops answering fails within io_timeout.
TEST(TcpTransport, SilentPeerTimesOut) {
  auto listener = ListenTcp("127.0.0.1", 0, 8);
  ASSERT_TRUE(listener.ok());
  auto port = LocalPort(listener->get());
  ASSERT_TRUE(port.ok());
  fabric::Url url;
  url.host = "127.0.0.1";
  url.port = *port;
  auto opts = ClientOpts();
  opts.connect_timeout = std::chrono::milliseconds(500);
  auto start = Clock::now();
  auto c = transports::Connect(url, opts);
  EXPECT_EQ(c.status().code(), Code::kTimeout) << c.status().ToString();
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
}

// A fake server that completes the handshake, OPEN and ATTACH, then swallows requests
// without ever answering: the client must fail them with kTimeout after io_timeout and
// drop the connection, never hang.
TEST(TcpTransport, HungServerTimesOutRequests) {
  auto listener = ListenTcp("127.0.0.1", 0, 8);
  ASSERT_TRUE(listener.ok());
  auto port = LocalPort(listener->get());
  ASSERT_TRUE(port.ok());
  std::atomic<bool> stop{false};
  std::thread fake([&] {
    std::vector<std::unique_ptr<Stream>> conns;
    auto deadline = Clock::now() + std::chrono::seconds(20);
    while (!stop && Clock::now() < deadline) {
      if (!WaitFd(listener->get(), POLLIN, Clock::now() + std::chrono::milliseconds(50)).ok()) continue;
      int fd = ::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      auto s = std::make_unique<Stream>(UniqueFd(fd));
      auto dl = Clock::now() + std::chrono::seconds(3);
      std::array<std::byte, wire::kClientHelloSize> hello{};
      if (!ReadExact(*s, hello, dl).ok()) continue;
      wire::ClientHello ch;
      if (!wire::DecodeClientHello(hello, &ch).ok()) continue;
      wire::ServerHello sh;
      sh.auth = wire::AuthMode::kNone;
      std::vector<std::byte> out;
      wire::EncodeServerHello(sh, &out);
      std::array<std::byte, wire::kFrameHeaderSize> raw{};
      wire::FrameHeader h;
      if (!WriteExact(*s, out, dl).ok() || !ReadExact(*s, raw, dl).ok() ||
          !wire::DecodeFrameHeader(raw, &h).ok()) {
        continue;
      }
      std::vector<std::byte> payload(h.payload_length);
      if (!ReadExact(*s, payload, dl).ok()) continue;
      out.clear();
      if (ch.channel == wire::Channel::kControl) {  // OPEN
        wire::OpenReply open;
        open.info = {"hung", 1u << 20, 1, fabric::BackingKind::kAnonymous, false};
        wire::EncodeOpenReply(open, &out);
      } else {  // ATTACH
        wire::EncodeAttachReply({1u << 20, 1, false}, &out);
      }
      h.reply = true;
      h.payload_length = static_cast<uint32_t>(out.size());
      std::vector<std::byte> frame;
      wire::AppendFrame(h, out, &frame);
      if (!WriteExact(*s, frame, dl).ok()) continue;
      conns.push_back(std::move(s));  // and never answer again
    }
  });
  fabric::Url url;
  url.host = "127.0.0.1";
  url.port = *port;
  auto opts = ClientOpts("");
  opts.io_timeout = std::chrono::milliseconds(700);
  auto client = transports::Connect(url, opts);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  auto remote = (*client)->Open("hung", OpenOpts(false, 2));
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();
  std::vector<std::byte> buf(8192);
  auto start = Clock::now();
  Status st = fabric::ReadAt(**remote, 0, buf);
  auto took = Clock::now() - start;
  EXPECT_EQ(st.code(), Code::kTimeout) << st.ToString();
  EXPECT_GE(took, std::chrono::milliseconds(600));
  EXPECT_LT(took, std::chrono::milliseconds(3000));
  // The timed-out connections are gone: further requests fail at once.
  start = Clock::now();
  st = fabric::ReadAt(**remote, 0, buf);
  EXPECT_FALSE(st.ok());
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(2000));
  // The control session times out as well.
  auto list = (*client)->List();
  EXPECT_EQ(list.status().code(), Code::kTimeout) << list.status().ToString();
  stop = true;
  fake.join();
}

TEST(TcpTransport, Authentication) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto wrong = transports::Connect(s->url(), ClientOpts("not the right secret at all"));
  EXPECT_EQ(wrong.status().code(), Code::kUnauthenticated) << wrong.status().ToString();
  auto none = transports::Connect(s->url(), ClientOpts(""));
  EXPECT_EQ(none.status().code(), Code::kUnauthenticated) << none.status().ToString();
  auto right = transports::Connect(s->url(), ClientOpts());
  EXPECT_TRUE(right.ok()) << right.status().ToString();
}

TEST(TcpTransport, InsecureOnlyOnLoopback) {
  fabric::ServerOptions insecure;
  insecure.insecure = true;
  fabric::Server server(insecure);
  ListenOptions lo;
  lo.port = 0;
  lo.host = "0.0.0.0";
  auto refused = TcpServer::Start(server, lo);
  EXPECT_EQ(refused.status().code(), Code::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("loopback"), std::string_view::npos)
      << refused.status().ToString();

  fabric::Server no_secret(fabric::ServerOptions{});
  lo.host = "127.0.0.1";
  EXPECT_EQ(TcpServer::Start(no_secret, lo).status().code(), Code::kInvalidArgument);

  auto s = TestServer::Start({}, insecure);
  ASSERT_NE(s, nullptr);
  auto anonymous = transports::Connect(s->url(), ClientOpts(""));
  ASSERT_TRUE(anonymous.ok()) << anonymous.status().ToString();
  MF_ASSERT_OK((*anonymous)->Create(Spec("open", 8192)).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, (*anonymous)->Open("open", OpenOpts(true, 1)));
  std::vector<std::byte> bytes(8192, std::byte{1});
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, bytes));
  // A client holding a secret refuses a server that cannot prove it knows it.
  auto downgrade = transports::Connect(s->url(), ClientOpts());
  EXPECT_EQ(downgrade.status().code(), Code::kUnauthenticated);
}

TEST(TcpTransport, Schemes) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto rdma = transports::Connect(s->url(fabric::Scheme::kRdma), ClientOpts());
  EXPECT_EQ(rdma.status().code(), Code::kUnsupported);
  auto automatic = transports::Connect(s->url(fabric::Scheme::kAuto), ClientOpts());
  ASSERT_TRUE(automatic.ok()) << automatic.status().ToString();
  EXPECT_EQ((*automatic)->transport(), "tcp");
  fabric::Url closed = s->url();
  s->Stop();
  auto refused = transports::Connect(closed, ClientOpts());
  EXPECT_EQ(refused.status().code(), Code::kUnavailable) << refused.status().ToString();
}

TEST(TcpTransport, OpenOptionsValidated) {
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = MustConnect(*s);
  ASSERT_NE(client, nullptr);
  MF_ASSERT_OK(client->Create(Spec("v", 8192)).status());
  EXPECT_EQ(client->Open("v", OpenOpts(false, 0)).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(client->Open("v", OpenOpts(false, 4, 0)).status().code(), Code::kInvalidArgument);
  // Remotes outlive their client.
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("v", OpenOpts(false, 1)));
  client.reset();
  std::vector<std::byte> buf(8192);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, buf));
}

}  // namespace
}  // namespace mf::tcp::testing

namespace mf::tcp {
namespace {

using testing::ClientOpts;
using testing::TestServer;

// Requests on one connection execute in order. A large READ reply is sent straight from
// the region (not copied), so a WRITE right behind it on the same connection must not
// change what the READ returns.
TEST(TcpTransport, PipelinedReadThenWriteOfTheSameRangeKeepsOrder) {
  constexpr size_t kLen = 1u << 20;
  constexpr int kRounds = 50;
  auto s = TestServer::Start();
  ASSERT_NE(s, nullptr);
  auto client = transports::Connect(s->url(), ClientOpts());
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE((*client)->Create({"order", kLen, fabric::BackingKind::kAnonymous, ""}).ok());
  fabric::OpenOptions oo;
  oo.writable = true;
  oo.connections = 1;
  auto remote = (*client)->Open("order", oo);
  ASSERT_TRUE(remote.ok()) << remote.status().ToString();
  auto buffer = (*remote)->AllocateBuffer(2 * kLen);
  ASSERT_TRUE(buffer.ok());
  std::span<std::byte> read_into = buffer->span().first(kLen);
  std::span<std::byte> write_from = buffer->span().subspan(kLen, kLen);
  std::vector<std::byte> current(kLen, std::byte{0});
  for (int round = 0; round < kRounds; ++round) {
    const auto next = static_cast<std::byte>(round + 1);
    std::fill(write_from.begin(), write_from.end(), next);
    fabric::IoBatch batch(2);
    const fabric::IoRequest requests[] = {
        {fabric::IoKind::kRead, 0, read_into, &*buffer, &batch, 1},
        {fabric::IoKind::kWrite, 0, write_from, &*buffer, &batch, 2},
    };
    (*remote)->Submit(requests);
    ASSERT_TRUE(batch.Wait().ok());
    ASSERT_TRUE(std::equal(read_into.begin(), read_into.end(), current.begin()))
        << "round " << round << ": the READ saw the WRITE queued behind it";
    std::fill(current.begin(), current.end(), next);
  }
  std::vector<std::byte> last(kLen);
  ASSERT_TRUE(fabric::ReadAt(**remote, 0, last).ok());
  EXPECT_EQ(last, current);
}

}  // namespace
}  // namespace mf::tcp
