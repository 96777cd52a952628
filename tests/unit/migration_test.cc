// Tests of fabric Migration over MemoryRemote: the hand-over wire codec (round trips,
// truncation, malformed input), the channel, the finalize happy path with a writer
// running during pre-copy, and the abort paths (destination gone mid-pull, suspend hook
// failing, destination unable to take the lease, channel broken mid-finalize).
#include "fabric/migration.h"

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "fabric/memory_remote.h"
#include "tests/migration_test_util.h"

namespace mf::fabric {
namespace {

namespace wire = migration_wire;
using std::chrono::milliseconds;

constexpr uint64_t kSize = 4u << 20;
constexpr size_t kChunk = 64u << 10;

// The server's write lease for MemoryRemotes: one writable handle at a time.
struct Lease {
  std::atomic<bool> held{false};
};

// A MemoryRemote whose writable handles hold a Lease until closed.
class LeasedRemote final : public Remote {
 public:
  LeasedRemote(std::shared_ptr<MemoryRegion> region, bool writable, std::shared_ptr<Lease> lease)
      : inner_(std::move(region), writable), lease_(std::move(lease)) {}
  ~LeasedRemote() override { (void)Close(); }
  const RegionInfo& info() const override { return inner_.info(); }
  bool writable() const override { return inner_.writable(); }
  std::string_view transport() const override { return "memory"; }
  size_t max_transfer() const override { return inner_.max_transfer(); }
  Result<Buffer> AllocateBuffer(size_t size) override { return inner_.AllocateBuffer(size); }
  void Submit(std::span<const IoRequest> requests) override { inner_.Submit(requests); }
  Status Flush() override { return inner_.Flush(); }
  Status Close() override {
    Status st = inner_.Close();
    if (inner_.writable() && !released_.exchange(true)) lease_->held.store(false);
    return st;
  }
  MemoryRemote& inner() { return inner_; }

 private:
  MemoryRemote inner_;
  std::shared_ptr<Lease> lease_;
  std::atomic<bool> released_{false};
};

Result<std::unique_ptr<Remote>> OpenLeased(const std::shared_ptr<MemoryRegion>& region,
                                           const std::shared_ptr<Lease>& lease, bool writable) {
  if (writable && lease->held.exchange(true)) return Status(Code::kBusy, "write lease held");
  return std::unique_ptr<Remote>(std::make_unique<LeasedRemote>(region, writable, lease));
}

std::pair<UniqueFd, UniqueFd> SocketPair() {
  int fds[2];
  EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

// ---- Wire codec -------------------------------------------------------------------------

std::vector<wire::Message> Samples() {
  return {
      wire::MakeHello({kSize, kChunk, 7, "region-a"}),
      wire::MakeReady(12345),
      wire::MakeDirtySet(wire::DirtySet{kChunk, 64, {{0, 2}, {5, 1}, {60, 4}}}),
      wire::MakeDirtySet(wire::DirtySet{kChunk, 64, {}}),
      wire::MakeLeaseReleased(),
      wire::MakeDone({1, 2, 3}),
      wire::MakeAbort(Status(Code::kBusy, "lease held")),
      wire::MakeChallenge(Nonce{1, 2, 3}),
      wire::MakeProof(Proof{9, 8, 7}),
      wire::MakeProgress(777),
  };
}

void ExpectSame(const wire::Message& a, const wire::Message& b) {
  ASSERT_EQ(a.type, b.type);
  EXPECT_EQ(a.hello, b.hello);
  EXPECT_EQ(a.ready_bytes, b.ready_bytes);
  EXPECT_EQ(a.dirty, b.dirty);
  EXPECT_EQ(a.done, b.done);
  EXPECT_EQ(a.abort.code(), b.abort.code());
  EXPECT_EQ(a.abort.message(), b.abort.message());
  EXPECT_EQ(a.auth, b.auth);
  EXPECT_EQ(a.progress_bytes, b.progress_bytes);
}

TEST(MigrationWire, RoundTripsEveryMessage) {
  for (const auto& m : Samples()) {
    const auto bytes = wire::Encode(m);
    size_t used = 0;
    auto back = wire::Decode(bytes, &used);
    ASSERT_TRUE(back.ok()) << wire::TypeName(m.type) << ": " << back.status().ToString();
    EXPECT_EQ(used, bytes.size());
    ExpectSame(m, *back);
  }
}

TEST(MigrationWire, EveryTruncationIsOutOfRange) {
  for (const auto& m : Samples()) {
    const auto bytes = wire::Encode(m);
    for (size_t n = 0; n < bytes.size(); ++n) {
      size_t used = 0;
      auto r = wire::Decode(std::span(bytes).first(n), &used);
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.status().code(), Code::kOutOfRange) << wire::TypeName(m.type) << " cut at " << n;
    }
  }
}

TEST(MigrationWire, RejectsMalformedHeaders) {
  const auto good = wire::Encode(wire::MakeReady(1));
  auto with = [&](size_t at, uint8_t v) {
    auto b = good;
    b[at] = std::byte{v};
    size_t used = 0;
    return wire::Decode(b, &used).status().code();
  };
  EXPECT_EQ(with(0, 0), Code::kProtocolError);     // type 0
  EXPECT_EQ(with(0, 99), Code::kProtocolError);    // unknown type
  EXPECT_EQ(with(1, 2), Code::kProtocolError);     // version
  EXPECT_EQ(with(2, 1), Code::kProtocolError);     // reserved
  EXPECT_EQ(with(7, 0x10), Code::kProtocolError);  // length above kMaxPayload
  EXPECT_EQ(with(4, 9), Code::kOutOfRange);        // longer than what follows
  // A payload longer than its type allows: trailing bytes.
  auto b = good;
  b[4] = std::byte{9};
  b.push_back(std::byte{0});
  size_t used = 0;
  EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError);
}

TEST(MigrationWire, RejectsBadDirtySets) {
  auto code = [](wire::DirtySet d) {
    const auto b = wire::Encode(wire::MakeDirtySet(std::move(d)));
    size_t used = 0;
    return wire::Decode(b, &used).status().code();
  };
  EXPECT_EQ(code({kChunk, 10, {{0, 0}}}), Code::kProtocolError);          // empty range
  EXPECT_EQ(code({kChunk, 10, {{5, 1}, {2, 1}}}), Code::kProtocolError);  // unordered
  EXPECT_EQ(code({kChunk, 10, {{0, 3}, {2, 1}}}), Code::kProtocolError);  // overlapping
  EXPECT_EQ(code({kChunk, 10, {{8, 3}}}), Code::kProtocolError);          // past the end
  EXPECT_EQ(code({kChunk, 10, {{~0ull, 2}}}), Code::kProtocolError);      // overflow
  EXPECT_EQ(code({0, 10, {}}), Code::kProtocolError);                     // chunk size 0
  EXPECT_EQ(code({kChunk, 10, {{9, 1}}}), Code::kOk);
  // A range count that disagrees with the bytes that follow.
  auto b = wire::Encode(wire::MakeDirtySet({kChunk, 10, {{1, 1}}}));
  b[wire::kHeaderSize + 16] = std::byte{2};
  size_t used = 0;
  EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError);
}

TEST(MigrationWire, RejectsBadAbortsAndHellos) {
  auto b = wire::Encode(wire::MakeAbort(Status(Code::kBusy, "x")));
  b[wire::kHeaderSize] = std::byte{0};  // code OK
  size_t used = 0;
  EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError);
  b[wire::kHeaderSize] = std::byte{200};
  EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError);
  EXPECT_EQ(wire::Decode(wire::Encode(wire::MakeHello({0, kChunk, 0, "r"})), &used).status().code(),
            Code::kProtocolError);
}

TEST(MigrationWire, RejectsAuthMessagesOfTheWrongLength) {
  for (const auto& m : {wire::MakeChallenge(Nonce{}), wire::MakeProof(Proof{}), wire::MakeProgress(1)}) {
    auto b = wire::Encode(m);
    // One byte short, with the header saying so: malformed, not truncated.
    b.pop_back();
    b[4] = std::byte{static_cast<uint8_t>(b.size() - wire::kHeaderSize)};
    size_t used = 0;
    EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError) << wire::TypeName(m.type);
    // One byte long: trailing bytes.
    b.push_back(std::byte{0});
    b.push_back(std::byte{0});
    b[4] = std::byte{static_cast<uint8_t>(b.size() - wire::kHeaderSize)};
    EXPECT_EQ(wire::Decode(b, &used).status().code(), Code::kProtocolError) << wire::TypeName(m.type);
  }
}

TEST(MigrationWire, DirtySetFromChunksMergesRuns) {
  const std::vector<uint64_t> chunks = {0, 1, 2, 7, 9, 10};
  const auto d = wire::DirtySet::FromChunks(kChunk, 16, chunks);
  EXPECT_EQ(d.ranges, (std::vector<wire::ChunkRange>{{0, 3}, {7, 1}, {9, 2}}));
  EXPECT_EQ(d.chunks(), 6u);
}

TEST(MigrationChannel, SendsReceivesAndSeesTheEnd) {
  auto [a, b] = SocketPair();
  MigrationChannel left(std::move(a));
  MigrationChannel right(std::move(b));
  ASSERT_TRUE(left.Send(wire::MakeDone({4, 5, 6}), milliseconds(1000)).ok());
  auto m = right.Receive(milliseconds(1000));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->done, (wire::Done{4, 5, 6}));
  EXPECT_EQ(right.Receive(milliseconds(50)).status().code(), Code::kTimeout);
  left.Shutdown();
  EXPECT_EQ(right.Receive(milliseconds(1000)).status().code(), Code::kUnavailable);
}

// ---- AuthenticateChannel ----------------------------------------------------------------

const Secret kSecret("0123456789abcdef0123456789abcdef");
const Secret kOtherSecret("fedcba9876543210fedcba9876543210");

struct AuthOutcome {
  Status source;
  Status destination;
  std::optional<UniqueFd> source_fd;
  std::optional<UniqueFd> destination_fd;
};

AuthOutcome Authenticate(const Secret& source_secret, const Secret& destination_secret) {
  auto [a, b] = SocketPair();
  AuthOutcome out;
  std::thread destination([&, fd = std::move(b)]() mutable {
    auto r = AuthenticateChannel(std::move(fd), destination_secret, MigrationSide::kDestination,
                                 milliseconds(5000));
    out.destination = r.status();
    if (r.ok()) out.destination_fd = std::move(r).value();
  });
  auto r = AuthenticateChannel(std::move(a), source_secret, MigrationSide::kSource, milliseconds(5000));
  out.source = r.status();
  if (r.ok()) out.source_fd = std::move(r).value();
  destination.join();
  return out;
}

TEST(MigrationAuth, SameSecretAuthenticatesBothSidesAndKeepsTheChannel) {
  AuthOutcome out = Authenticate(kSecret, kSecret);
  ASSERT_TRUE(out.source.ok()) << out.source.ToString();
  ASSERT_TRUE(out.destination.ok()) << out.destination.ToString();
  // The channel goes on with the migration's first message.
  MigrationChannel source(std::move(*out.source_fd));
  MigrationChannel destination(std::move(*out.destination_fd));
  ASSERT_TRUE(source.Send(wire::MakeHello({kSize, kChunk, 1, "r"}), milliseconds(1000)).ok());
  auto hello = destination.Receive(milliseconds(1000));
  ASSERT_TRUE(hello.ok()) << hello.status().ToString();
  EXPECT_EQ(hello->type, wire::Type::kHello);
}

TEST(MigrationAuth, DifferentSecretsFailOnBothSidesWithAClearError) {
  AuthOutcome out = Authenticate(kSecret, kOtherSecret);
  EXPECT_EQ(out.destination.code(), Code::kUnauthenticated) << out.destination.ToString();
  EXPECT_NE(out.destination.message().find("different secrets"), std::string_view::npos);
  EXPECT_EQ(out.source.code(), Code::kUnauthenticated) << out.source.ToString();
  EXPECT_NE(out.source.message().find("different secrets"), std::string_view::npos);
  EXPECT_FALSE(out.source_fd.has_value());
}

TEST(MigrationAuth, APeerWithoutASecretIsAProtocolError) {
  auto [a, b] = SocketPair();
  MigrationChannel unauthenticated_source(std::move(a));
  ASSERT_TRUE(unauthenticated_source.Send(wire::MakeHello({kSize, kChunk, 1, "r"}), milliseconds(1000)).ok());
  auto r = AuthenticateChannel(std::move(b), kSecret, MigrationSide::kDestination, milliseconds(1000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kProtocolError);
  EXPECT_NE(r.status().message().find("HELLO"), std::string_view::npos) << r.status().ToString();
}

TEST(MigrationAuth, ASilentPeerTimesOut) {
  auto [a, b] = SocketPair();
  auto r = AuthenticateChannel(std::move(b), kSecret, MigrationSide::kDestination, milliseconds(100));
  EXPECT_EQ(r.status().code(), Code::kTimeout);
}

// ---- Finalize ---------------------------------------------------------------------------

std::vector<std::byte> Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

class MigrationTest : public mf::testing::MigrationWriterTest {
 protected:
  void SetUp() override {
    region_ = std::make_shared<MemoryRegion>("r", kSize);
    const auto p = Pattern(kSize, 1);
    std::memcpy(region_->data(), p.data(), kSize);
    auto w = Open(true);
    ASSERT_TRUE(w.ok());
    MountOptions mo;
    mo.chunk_size = kChunk;
    mo.push_interval = milliseconds(5);
    auto s = MountSource::Create(std::move(w).value(), mo, [this] { return Open(true); });
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    source_ = std::move(s).value();
    ASSERT_TRUE(source_->mount().WaitAllLocal(milliseconds(20000)).ok());
    auto [a, b] = SocketPair();
    source_fd_ = std::move(a);
    dest_fd_ = std::move(b);
  }

  Result<std::unique_ptr<Remote>> Open(bool writable) { return OpenLeased(region_, lease_, writable); }

  // A slow read-only remote for the destination, so that pre-copy overlaps the writer.
  std::unique_ptr<Remote> SlowReader() {
    auto r = std::make_unique<LeasedRemote>(region_, false, lease_);
    r->inner().SetDelay(std::chrono::microseconds(500));
    return r;
  }

  LeecherOptions DestOptions() {
    LeecherOptions o;
    o.mount.chunk_size = 32u << 10;  // differs from the source's on purpose
    o.open_writable = [this] { return Open(true); };
    return o;
  }

  void StartWriter() {
    StartWriterLoop([this, rng = std::mt19937_64(5), buf = std::vector<std::byte>()](uint64_t) mutable {
      const uint64_t off = rng() % (kSize / 2);  // a working set: half the region
      buf.resize(1 + rng() % std::min<uint64_t>(kSize - off, 4000));
      for (auto& b : buf) b = static_cast<std::byte>(rng());
      ASSERT_TRUE(source_->mount().Write(off, buf).ok());
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    });
  }
  SeederOptions Hooks() {
    SeederOptions o;
    o.suspend = [this] {
      if (writer_running()) AwaitWrites(40);  // some writes during pre-copy
      ++suspends_;
      StopWriter();
      return Status::Ok();
    };
    o.resume = [this] { ++resumes_; };
    o.done_timeout = milliseconds(20000);
    return o;
  }
  std::vector<std::byte> SourceBytes() { return {source_->mount().data(), source_->mount().data() + kSize}; }
  std::vector<std::byte> ServerBytes() { return {region_->data(), region_->data() + kSize}; }
  // The source resumed with the lease: writes go through to the server again.
  void ExpectSourceWritable() {
    EXPECT_TRUE(lease_->held.load());
    EXPECT_EQ(Open(true).status().code(), Code::kBusy);
    EXPECT_FALSE(source_->mount().detached());
    const auto more = Pattern(1000, 77);
    ASSERT_TRUE(source_->mount().Write(12345, more).ok());
    ASSERT_TRUE(source_->mount().Sync().ok());
    EXPECT_EQ(SourceBytes(), ServerBytes()) << "nothing lost";
  }

  std::shared_ptr<MemoryRegion> region_;
  std::shared_ptr<Lease> lease_ = std::make_shared<Lease>();
  std::unique_ptr<MountSource> source_;
  UniqueFd source_fd_, dest_fd_;
  int suspends_ = 0, resumes_ = 0;
};

TEST_F(MigrationTest, FinalizeHandsOverTheLatestBytesAndTheLease) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok()) << seeder.status().ToString();
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok()) << leecher.status().ToString();
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(suspends_, 1);
  EXPECT_EQ(resumes_, 0);
  EXPECT_GT(writes_.load(), 0u);
  EXPECT_GT(stats->dirty_chunks, 0u);
  EXPECT_LE(stats->dirty_chunks, kSize / kChunk / 2 + 1);
  EXPECT_GT(stats->downtime_ns, 0u);
  EXPECT_GE(stats->downtime_ns, stats->push_ns + stats->handover_ns);
  EXPECT_EQ(stats->precopy_bytes, kSize);
  EXPECT_EQ((*seeder)->progress().tracked_chunks, stats->dirty_chunks);

  // The destination holds the lease, is writable and has exactly the source's last bytes.
  Mount& dm = (*leecher)->mount();
  EXPECT_FALSE(dm.read_only());
  EXPECT_EQ(Open(true).status().code(), Code::kBusy);
  ASSERT_NE((*leecher)->writable_remote(), nullptr);
  std::vector<std::byte> dest_bytes(kSize);
  ASSERT_TRUE(dm.Read(0, dest_bytes).ok());
  const auto source_bytes = SourceBytes();
  EXPECT_TRUE(source_->mount().detached());
  EXPECT_EQ(ServerBytes(), source_bytes);
  EXPECT_EQ(dest_bytes, source_bytes);

  // The destination goes on writing and can push.
  const auto more = Pattern(5000, 9);
  ASSERT_TRUE(dm.Write(100, more).ok());
  ASSERT_TRUE(dm.Sync().ok());
  EXPECT_EQ(std::memcmp(region_->data() + 100, more.data(), more.size()), 0);
}

TEST_F(MigrationTest, TheDestinationIsTheSourceOfTheNextMigration) {
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  Status run;
  ASSERT_TRUE(Migrate(**seeder, **leecher, &run).ok());
  ASSERT_TRUE(run.ok()) << run.ToString();
  auto taken = (*leecher)->TakeOver();
  ASSERT_TRUE(taken.ok()) << taken.status().ToString();
  auto second =
      MountSource::Adopt(std::move(taken->remote), std::move(taken->mount), [this] { return Open(true); });
  ASSERT_TRUE(second.ok()) << second.status().ToString();

  // Hop two: the first destination writes, then hands over to a third host.
  auto [a, b] = SocketPair();
  auto seeder2 = Seeder::Start(**second, std::move(a), SeederOptions{});
  ASSERT_TRUE(seeder2.ok());
  const auto more = Pattern(70000, 21);
  ASSERT_TRUE((*second)->mount().Write(kSize - 70000, more).ok());
  auto third =
      Leecher::Start(std::make_unique<LeasedRemote>(region_, false, lease_), std::move(b), DestOptions());
  ASSERT_TRUE(third.ok());
  auto stats = Migrate(**seeder2, **third, &run);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(stats->dirty_chunks, 3u);  // 70000 bytes at the end: three 32 KiB chunks of hop one
  std::vector<std::byte> bytes(kSize);
  ASSERT_TRUE((*third)->mount().Read(0, bytes).ok());
  EXPECT_TRUE(bytes == ServerBytes());
  EXPECT_EQ(std::memcmp(bytes.data() + kSize - 70000, more.data(), more.size()), 0);
  EXPECT_EQ(Open(true).status().code(), Code::kBusy);
}

// A write made before pre-copy began but pushed only later (after the destination pulled
// its chunk) must be in the dirty set.
TEST_F(MigrationTest, WritesNotPushedBeforePreCopyAreHandedOver) {
  source_.reset();  // releases the lease
  auto w = Open(true);
  ASSERT_TRUE(w.ok());
  MountOptions mo;
  mo.chunk_size = kChunk;  // no push interval: only the finalize pushes
  auto s = MountSource::Create(std::move(w).value(), mo, [this] { return Open(true); });
  ASSERT_TRUE(s.ok());
  source_ = std::move(s).value();
  const auto early = Pattern(3000, 33);
  ASSERT_TRUE(source_->mount().Write(kChunk * 5 + 10, early).ok());
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  EXPECT_EQ(source_->tracked_count(), 1u);
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_TRUE(run.ok()) << run.ToString();
  EXPECT_EQ(stats->dirty_chunks, 1u);
  std::vector<std::byte> got(early.size());
  ASSERT_TRUE((*leecher)->mount().Read(kChunk * 5 + 10, got).ok());
  EXPECT_EQ(got, early);
}

TEST_F(MigrationTest, TheSourceSeesTheDestinationsPreCopyProgress) {
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  auto slow = std::make_unique<LeasedRemote>(region_, false, lease_);
  slow->inner().SetDelay(std::chrono::milliseconds(5));  // 128 chunks, 8 at a time: ~80 ms
  LeecherOptions o = DestOptions();
  o.progress_interval = milliseconds(2);
  auto leecher = Leecher::Start(std::move(slow), std::move(dest_fd_), o);
  ASSERT_TRUE(leecher.ok()) << leecher.status().ToString();
  Status ran;
  std::thread dest([&] { ran = (*leecher)->Run(); });
  Result<MigrationStats> stats = Internal("not run");
  std::thread finalize([&] { stats = (*seeder)->Finalize(); });
  uint64_t partial = 0;  // a report of a pre-copy under way
  for (int i = 0; i < 100000 && partial == 0 && (*seeder)->progress().destination_ready_bytes == 0; ++i) {
    const uint64_t local = (*seeder)->progress().destination_local_bytes;
    if (local > 0 && local < kSize) partial = local;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  finalize.join();
  dest.join();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_TRUE(ran.ok()) << ran.ToString();
  EXPECT_GT(partial, 0u) << "no PROGRESS seen during the pre-copy";
  EXPECT_EQ((*seeder)->progress().destination_local_bytes, kSize);
}

TEST_F(MigrationTest, DestinationGoneMidPullLeavesTheSourceRunning) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  while ((*leecher)->mount().stats().bytes_local == 0)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  EXPECT_LT((*leecher)->mount().stats().bytes_local, kSize) << "the pull should still run";
  (*leecher)->Kill();
  auto stats = (*seeder)->Finalize();
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(suspends_, 0);  // never stopped
  EXPECT_GT(writes_.load(), 0u);
  StopWriter();
  ExpectSourceWritable();
}

TEST_F(MigrationTest, ADestinationThatOnlyReportsProgressTimesOut) {
  constexpr milliseconds kReadyTimeout{300};
  constexpr auto kReportFor = std::chrono::seconds(5);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), [&] {
    SeederOptions o = Hooks();
    o.ready_timeout = kReadyTimeout;
    return o;
  }());
  ASSERT_TRUE(seeder.ok());
  // A destination that reports progress as fast as it can and never gets ready.
  MigrationChannel dest(std::move(dest_fd_));
  std::atomic<bool> stop{false};
  std::thread reporter([&] {
    const auto until = std::chrono::steady_clock::now() + kReportFor;
    for (uint64_t n = 1; !stop.load() && std::chrono::steady_clock::now() < until; ++n) {
      if (!dest.Send(wire::MakeProgress(n), milliseconds(1000)).ok()) return;
    }
  });
  const auto start = std::chrono::steady_clock::now();
  auto stats = (*seeder)->Finalize();
  const auto took = std::chrono::steady_clock::now() - start;
  stop.store(true);
  reporter.join();
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kTimeout) << stats.status().ToString();
  EXPECT_NE(stats.status().ToString().find("reported progress up to"), std::string::npos)
      << stats.status().ToString();
  EXPECT_LT(took, kReportFor / 2) << "the reports stretched the READY deadline";
  EXPECT_EQ(suspends_, 0);
  ExpectSourceWritable();
}

TEST_F(MigrationTest, FailingSuspendHookAbortsAndResumes) {
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), [this] {
    SeederOptions o = Hooks();
    o.suspend = [] { return Status(Code::kIoError, "cannot freeze"); };
    return o;
  }());
  ASSERT_TRUE(seeder.ok());
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kIoError);
  EXPECT_FALSE(run.ok());
  EXPECT_EQ(resumes_, 1);
  EXPECT_TRUE((*leecher)->mount().read_only());
  ExpectSourceWritable();
}

TEST_F(MigrationTest, DestinationUnableToTakeTheLeaseHandsItBack) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  LeecherOptions o = DestOptions();
  o.open_writable = []() -> Result<std::unique_ptr<Remote>> { return Unavailable("server unreachable"); };
  auto leecher = Leecher::Start(SlowReader(), std::move(dest_fd_), std::move(o));
  ASSERT_TRUE(leecher.ok());
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kUnavailable) << stats.status().ToString();
  EXPECT_EQ(run.code(), Code::kUnavailable);
  EXPECT_EQ(suspends_, 1);
  EXPECT_EQ(resumes_, 1);
  EXPECT_TRUE((*leecher)->mount().read_only());
  ExpectSourceWritable();
}

TEST_F(MigrationTest, ChannelBrokenAfterTheLeaseReleaseRetakesIt) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  // A destination that vanishes right after the source released the lease.
  std::thread dest([fd = std::move(dest_fd_)]() mutable {
    MigrationChannel c(std::move(fd));
    auto hello = c.Receive(milliseconds(5000));
    ASSERT_TRUE(hello.ok());
    ASSERT_TRUE(c.Send(wire::MakeReady(kSize), milliseconds(5000)).ok());
    auto dirty = c.Receive(milliseconds(5000));
    ASSERT_TRUE(dirty.ok());
    EXPECT_EQ(dirty->type, wire::Type::kDirtySet);
    auto released = c.Receive(milliseconds(5000));
    ASSERT_TRUE(released.ok());
    EXPECT_EQ(released->type, wire::Type::kLeaseReleased);
    c.Shutdown();
  });
  auto stats = (*seeder)->Finalize();
  dest.join();
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kUnavailable) << stats.status().ToString();
  EXPECT_EQ(resumes_, 1);
  ExpectSourceWritable();
}

TEST_F(MigrationTest, SourceStaysSuspendedWhenTheDestinationKeepsTheLease) {
  auto o = Hooks();
  o.retake_timeout = milliseconds(100);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), o);
  ASSERT_TRUE(seeder.ok());
  std::unique_ptr<Remote> taken;
  // A destination that takes the lease and then loses the channel before DONE.
  std::thread dest([&, fd = std::move(dest_fd_)]() mutable {
    MigrationChannel c(std::move(fd));
    ASSERT_TRUE(c.Receive(milliseconds(5000)).ok());
    ASSERT_TRUE(c.Send(wire::MakeReady(kSize), milliseconds(5000)).ok());
    ASSERT_TRUE(c.Receive(milliseconds(5000)).ok());
    ASSERT_TRUE(c.Receive(milliseconds(5000)).ok());
    auto w = Open(true);
    ASSERT_TRUE(w.ok());
    taken = std::move(w).value();
    c.Shutdown();
  });
  auto stats = (*seeder)->Finalize();
  dest.join();
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kBusy) << stats.status().ToString();
  EXPECT_EQ(resumes_, 0) << "never two writers";
  EXPECT_TRUE(source_->mount().detached());
}

}  // namespace
}  // namespace mf::fabric
