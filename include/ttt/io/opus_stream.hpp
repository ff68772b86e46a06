#pragma once
// Streaming Ogg Opus (RFC 7845) for a real-time conversation server speaking Kyutai's protocol:
// their web and Python clients send and receive mono 24 kHz audio as Ogg-wrapped Opus, each
// WebSocket message carrying whatever Ogg pages are ready (Kyutai's side: the `sphn` package's
// OpusStreamWriter / OpusStreamReader).
//
//   OpusStreamWriter: float PCM in (any chunk size) -> Opus frames (libopus) -> Ogg pages
//                     (libogg): the OpusHead and OpusTags header pages first, then a page per
//                     frame (by default), flushed at once for low latency.
//   OpusStreamReader: Ogg bytes in (any split, mid-page included) -> float PCM out, with the
//                     pre-skip and the end trimming of RFC 7845 applied.
//
// libogg frames and checks pages (capture pattern, CRC, lacing), libopus codes the audio. The
// two 19+ byte header packets (OpusHead, OpusTags) are RFC 7845's own and neither library reads
// or writes them: they are built and read here, every length checked against the packet.
// Every bad input is one ttt::Error that names the problem and the byte offset; memory stays
// bounded (see OpusReaderOptions). Link the ttt::opus CMake target (libopus + libogg, defines
// TTT_WITH_OPUS=1). See docs/audio.md.
#include <ogg/ogg.h>
#include <opus.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ttt/core/error.hpp"

namespace ttt::io {

// Kyutai's stream rate (Mimi's rate).
inline constexpr int64_t kOpusStreamRate = 24000;

enum class OpusApplication {
  voip,               // OPUS_APPLICATION_VOIP: tuned for speech (what sphn / Kyutai use)
  audio,              // OPUS_APPLICATION_AUDIO: tuned for fidelity to the waveform
  restricted_lowdelay // OPUS_APPLICATION_RESTRICTED_LOWDELAY: CELT only, 2.5 ms less delay
};

struct OpusWriterOptions {
  int64_t sample_rate = kOpusStreamRate;  // of the PCM given: 8000, 12000, 16000, 24000 or 48000
  int frame_ms = 20;                      // Opus frame: 10, 20, 40 or 60 ms (20 ms = 480 samples at 24 kHz)
  int bitrate = 32000;                    // bits/s, 6000..510000 (VBR target when vbr)
  bool vbr = true;
  int complexity = 10;                    // 0..10
  OpusApplication application = OpusApplication::voip;
  int frames_per_page = 1;                // Opus packets per Ogg page: 1 = a page per frame (latency)
  uint32_t serial = 0x74747401;           // Ogg stream serial number (fixed: same input, same bytes)
};

struct OpusReaderOptions {
  int64_t sample_rate = kOpusStreamRate;  // of the PCM out: 8000, 12000, 16000, 24000 or 48000
  // RFC 7845 trimming: drop the header's pre-skip at the start, and at an end-of-stream page
  // cut the decoded audio to its granule position. false: every decoded sample, as sphn's
  // reader (and so Kyutai's server) returns them.
  bool trim = true;
  // One packet (an Opus packet or a header) larger than this is refused. A valid Opus packet is
  // at most 120 ms of 1275-byte frames (61,440 bytes incl. framing); this leaves room for an
  // OpusTags header with a few comments. libogg buffers a packet that spans pages until it is
  // whole: this bounds that buffer.
  int64_t max_packet_bytes = 256 * 1024;
  // Decoded samples waiting for read_pcm(). A byte of Ogg can decode to thousands of samples (a
  // 1-byte packet can be 120 ms of silence); a caller that appends without reading is stopped
  // here instead of growing without bound. A server reads after each append and never gets near.
  double max_pending_seconds = 60.0;
};

// The two header packets, as read (RFC 7845 section 5).
struct OpusStreamHeader {
  int version = 0;
  int channels = 0;               // 1 or 2 (stereo is decoded to mono by libopus)
  int pre_skip = 0;               // samples at 48 kHz dropped from the start of the decoded audio
  uint32_t input_sample_rate = 0; // informational only (Opus always codes at 48 kHz internally)
  int output_gain_q8 = 0;         // dB in Q7.8, applied by the decoder
  int mapping_family = 0;         // 0 only
  uint32_t serial = 0;
  std::string vendor;
  std::vector<std::string> comments;
};

namespace detail {

inline void check_opus_rate(const char* who, int64_t rate) {
  TTT_CHECK(rate == 8000 || rate == 12000 || rate == 16000 || rate == 24000 || rate == 48000, who,
            ": sample rate ", rate, " Hz is not one Opus codes at (8000, 12000, 16000, 24000, 48000)");
}

inline void put_le16(std::vector<unsigned char>& b, uint32_t v) {
  b.push_back(static_cast<unsigned char>(v & 0xff));
  b.push_back(static_cast<unsigned char>((v >> 8) & 0xff));
}
inline void put_le32(std::vector<unsigned char>& b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>((v >> (8 * i)) & 0xff));
}
inline uint32_t get_le32(const unsigned char* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
inline uint32_t get_le16(const unsigned char* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8); }

// The first bytes of a packet, printable, for messages ("\x01vorbis").
inline std::string packet_start(const unsigned char* p, long n) {
  std::string s;
  for (long i = 0; i < std::min<long>(n, 8); ++i) {
    const unsigned char c = p[i];
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
      s += char(c);
    } else {
      static const char* hex = "0123456789abcdef";
      s += "\\x";
      s += hex[c >> 4];
      s += hex[c & 15];
    }
  }
  return s;
}

// What a first packet that is not OpusHead probably is.
inline const char* codec_of(const unsigned char* p, long n) {
  auto starts = [&](const char* magic, long len) { return n >= len && std::memcmp(p, magic, size_t(len)) == 0; };
  if (starts("\x01vorbis", 7)) return "Vorbis";
  if (starts("Speex   ", 8)) return "Speex";
  if (starts("\x7f" "FLAC", 5)) return "FLAC";
  if (starts("\x80theora", 7)) return "Theora";
  if (starts("fishead", 7)) return "Ogg Skeleton";
  return nullptr;
}

struct OpusEncoderDeleter {
  void operator()(OpusEncoder* e) const { opus_encoder_destroy(e); }
};
struct OpusDecoderDeleter {
  void operator()(OpusDecoder* d) const { opus_decoder_destroy(d); }
};

}  // namespace detail

// ---- writer ------------------------------------------------------------------------------------

class OpusStreamWriter {
 public:
  explicit OpusStreamWriter(const OpusWriterOptions& opt = {}) : opt_(opt) {
    const char* who = "OpusStreamWriter";
    detail::check_opus_rate(who, opt.sample_rate);
    TTT_CHECK(opt.frame_ms == 10 || opt.frame_ms == 20 || opt.frame_ms == 40 || opt.frame_ms == 60, who,
              ": frame_ms ", opt.frame_ms, " is not an Opus frame duration this writer uses (10, 20, 40, 60)");
    TTT_CHECK(opt.bitrate >= 6000 && opt.bitrate <= 510000, who, ": bitrate ", opt.bitrate,
              " bits/s is outside Opus's 6000..510000");
    TTT_CHECK(opt.complexity >= 0 && opt.complexity <= 10, who, ": complexity ", opt.complexity, " is outside 0..10");
    TTT_CHECK(opt.frames_per_page >= 1 && opt.frames_per_page <= 255, who, ": frames_per_page ", opt.frames_per_page,
              " is outside 1..255");
    frame_ = opt.sample_rate * opt.frame_ms / 1000;
    scale_ = 48000 / opt.sample_rate;
    const int app = opt.application == OpusApplication::voip    ? OPUS_APPLICATION_VOIP
                    : opt.application == OpusApplication::audio ? OPUS_APPLICATION_AUDIO
                                                                 : OPUS_APPLICATION_RESTRICTED_LOWDELAY;
    int err = OPUS_OK;
    enc_.reset(opus_encoder_create(opus_int32(opt.sample_rate), 1, app, &err));
    TTT_CHECK(err == OPUS_OK && enc_, who, ": opus_encoder_create failed (libopus: ", opus_strerror(err), ")");
    ctl_ok(opus_encoder_ctl(enc_.get(), OPUS_SET_BITRATE(opt.bitrate)), "OPUS_SET_BITRATE");
    ctl_ok(opus_encoder_ctl(enc_.get(), OPUS_SET_VBR(opt.vbr ? 1 : 0)), "OPUS_SET_VBR");
    ctl_ok(opus_encoder_ctl(enc_.get(), OPUS_SET_COMPLEXITY(opt.complexity)), "OPUS_SET_COMPLEXITY");
    opus_int32 la = 0;
    ctl_ok(opus_encoder_ctl(enc_.get(), OPUS_GET_LOOKAHEAD(&la)), "OPUS_GET_LOOKAHEAD");
    lookahead_ = la;
    TTT_CHECK(ogg_stream_init(&os_, int(opt.serial)) == 0, who, ": ogg_stream_init failed");
    os_ok_ = true;
    frame_buf_.reserve(size_t(frame_));
    packet_.resize(4000);  // libopus's recommended maximum packet buffer

    // OpusHead (RFC 7845 5.1): version 1, mono, pre-skip = the encoder's lookahead at 48 kHz,
    // the input rate (informational), gain 0, mapping family 0. Its own page, BOS.
    std::vector<unsigned char> head = {'O', 'p', 'u', 's', 'H', 'e', 'a', 'd', 1, 1};
    detail::put_le16(head, uint32_t(pre_skip()));
    detail::put_le32(head, uint32_t(opt.sample_rate));
    detail::put_le16(head, 0);
    head.push_back(0);
    put_packet(head.data(), long(head.size()), /*bos=*/true, /*eos=*/false, 0);
    flush_pages();
    // OpusTags (5.2): the vendor string, no comments. Its own page; audio starts a new one.
    const std::string vendor = std::string("ttt (") + opus_get_version_string() + ")";
    std::vector<unsigned char> tags = {'O', 'p', 'u', 's', 'T', 'a', 'g', 's'};
    detail::put_le32(tags, uint32_t(vendor.size()));
    tags.insert(tags.end(), vendor.begin(), vendor.end());
    detail::put_le32(tags, 0);
    put_packet(tags.data(), long(tags.size()), false, false, 0);
    flush_pages();
  }
  OpusStreamWriter(const OpusStreamWriter&) = delete;
  OpusStreamWriter& operator=(const OpusStreamWriter&) = delete;
  ~OpusStreamWriter() {
    if (os_ok_) ogg_stream_clear(&os_);
  }

  // Any number of samples (0 included). Every complete frame is encoded at once and its page
  // is ready for read_bytes(); the remainder waits for the next call or finish().
  void append_pcm(const float* pcm, size_t n) {
    TTT_CHECK(!finished_, "OpusStreamWriter: append_pcm after finish()");
    TTT_CHECK(pcm != nullptr || n == 0, "OpusStreamWriter: append_pcm got a null pointer for ", n, " samples");
    for (size_t i = 0; i < n; ++i)
      TTT_CHECK(std::isfinite(pcm[i]), "OpusStreamWriter: sample ", samples_in_ + int64_t(i), " is ",
                std::isnan(pcm[i]) ? "NaN" : "infinite", "; refusing to encode it");
    size_t done = 0;
    while (done < n) {
      const size_t take = std::min(n - done, size_t(frame_) - frame_buf_.size());
      frame_buf_.insert(frame_buf_.end(), pcm + done, pcm + done + take);
      done += take;
      if (int64_t(frame_buf_.size()) == frame_) encode_frame(false);
    }
    samples_in_ += int64_t(n);
  }
  void append_pcm(const std::vector<float>& pcm) { append_pcm(pcm.data(), pcm.size()); }

  // Ends the stream: the last partial frame and the encoder's lookahead are flushed with
  // silence, and the last page (end-of-stream) carries the granule position that trims the
  // decoded audio to exactly the samples appended. Nothing can be appended afterwards.
  void finish() {
    if (finished_) return;
    // Decoded length (48 kHz units, pre-skip included) that covers every input sample.
    const int64_t needed = lookahead_ + samples_in_;
    final_granule_ = needed * scale_;
    while (encoded_ < needed || packets_ == 0) {
      frame_buf_.resize(size_t(frame_), 0.f);
      encode_frame(encoded_ + frame_ >= needed);
    }
    flush_pages();
    finished_ = true;
  }

  // Everything produced since the last call (whole Ogg pages); empty when nothing is ready.
  std::vector<unsigned char> read_bytes() {
    std::vector<unsigned char> out;
    out.swap(out_);
    return out;
  }
  // The same, appended to `out`; returns the number of bytes appended.
  size_t read_bytes(std::vector<unsigned char>& out) {
    const size_t n = out_.size();
    out.insert(out.end(), out_.begin(), out_.end());
    out_.clear();
    return n;
  }

  int64_t sample_rate() const { return opt_.sample_rate; }
  int64_t frame_samples() const { return frame_; }
  int64_t lookahead() const { return lookahead_; }        // encoder delay, samples at sample_rate()
  int64_t pre_skip() const { return lookahead_ * scale_; } // as written in OpusHead (48 kHz)
  int64_t samples_in() const { return samples_in_; }
  int64_t packets() const { return packets_; }
  int64_t pages() const { return pages_; }
  int64_t bytes_out() const { return bytes_out_; }
  bool finished() const { return finished_; }

 private:
  void ctl_ok(int r, const char* what) {
    TTT_CHECK(r == OPUS_OK, "OpusStreamWriter: opus_encoder_ctl(", what, ") failed (libopus: ", opus_strerror(r), ")");
  }

  void put_packet(const unsigned char* data, long n, bool bos, bool eos, int64_t granule) {
    ogg_packet op{};
    op.packet = const_cast<unsigned char*>(data);
    op.bytes = n;
    op.b_o_s = bos ? 1 : 0;
    op.e_o_s = eos ? 1 : 0;
    op.granulepos = granule;
    op.packetno = packetno_++;
    TTT_CHECK(ogg_stream_packetin(&os_, &op) == 0, "OpusStreamWriter: ogg_stream_packetin failed");
  }

  void take_page(const ogg_page& og) {
    out_.insert(out_.end(), og.header, og.header + og.header_len);
    out_.insert(out_.end(), og.body, og.body + og.body_len);
    bytes_out_ += og.header_len + og.body_len;
    ++pages_;
  }
  void flush_pages() {
    ogg_page og;
    while (ogg_stream_flush(&os_, &og) != 0) take_page(og);
  }

  void encode_frame(bool last) {
    const opus_int32 n = opus_encode_float(enc_.get(), frame_buf_.data(), int(frame_), packet_.data(),
                                           opus_int32(packet_.size()));
    TTT_CHECK(n > 0, "OpusStreamWriter: opus_encode_float failed (libopus: ", opus_strerror(n), ")");
    frame_buf_.clear();
    encoded_ += frame_;
    ++packets_;
    // Granule position: decoded samples at 48 kHz up to the end of this packet (pre-skip
    // included); the end-of-stream packet's is the trimmed length.
    const int64_t granule = last ? final_granule_ : encoded_ * scale_;
    put_packet(packet_.data(), long(n), false, last, granule);
    if (last || packets_ % opt_.frames_per_page == 0) {
      flush_pages();
    } else {
      ogg_page og;  // libogg closes a page by itself past ~4 KB
      while (ogg_stream_pageout(&os_, &og) != 0) take_page(og);
    }
  }

  OpusWriterOptions opt_;
  std::unique_ptr<OpusEncoder, detail::OpusEncoderDeleter> enc_;
  ogg_stream_state os_{};
  bool os_ok_ = false;
  int64_t frame_ = 0, scale_ = 2, lookahead_ = 0;
  std::vector<float> frame_buf_;
  std::vector<unsigned char> packet_, out_;
  int64_t samples_in_ = 0, encoded_ = 0, packets_ = 0, pages_ = 0, bytes_out_ = 0, packetno_ = 0;
  int64_t final_granule_ = 0;
  bool finished_ = false;
};

// ---- reader ------------------------------------------------------------------------------------

class OpusStreamReader {
 public:
  explicit OpusStreamReader(const OpusReaderOptions& opt = {}) : opt_(opt) {
    detail::check_opus_rate("OpusStreamReader", opt.sample_rate);
    TTT_CHECK(opt.max_packet_bytes >= 1024, "OpusStreamReader: max_packet_bytes ", opt.max_packet_bytes,
              " is below 1024");
    TTT_CHECK(opt.max_pending_seconds > 0 && opt.max_pending_seconds <= 86400, "OpusStreamReader: max_pending_seconds ",
              opt.max_pending_seconds, " is outside (0, 86400]");
    scale_ = 48000 / opt.sample_rate;
    max_pending_ = std::max<int64_t>(1, int64_t(opt.max_pending_seconds * double(opt.sample_rate)));
    ogg_sync_init(&oy_);
    decode_buf_.resize(size_t(opt.sample_rate * 120 / 1000));  // the longest Opus packet: 120 ms
  }
  OpusStreamReader(const OpusStreamReader&) = delete;
  OpusStreamReader& operator=(const OpusStreamReader&) = delete;
  ~OpusStreamReader() {
    ogg_sync_clear(&oy_);
    if (os_ok_) ogg_stream_clear(&os_);
  }

  // Any bytes of the stream, split anywhere. Whole pages are decoded at once; a partial page
  // waits in libogg's buffer (at most one page, < 64 KiB). Throws ttt::Error on bad input;
  // after that the reader is failed and every call throws the same error again (the samples
  // decoded before the bad page can still be read).
  void append_bytes(const void* data, size_t n) {
    rethrow_if_failed();
    if (n == 0) return;
    TTT_CHECK(data != nullptr, "OpusStreamReader: append_bytes got a null pointer for ", n, " bytes");
    try {
      const auto* p = static_cast<const unsigned char*>(data);
      // In slices, decoding the pages of each before taking the next: libogg's sync buffer then
      // never holds more than one slice plus one incomplete page, whatever n is.
      constexpr size_t kSlice = 64 * 1024;
      for (size_t off = 0; off < n; off += kSlice) {
        const size_t len = std::min(kSlice, n - off);
        check_capture(p + off, len);
        char* buf = ogg_sync_buffer(&oy_, long(len));
        TTT_CHECK(buf != nullptr, "out of memory in libogg's sync buffer");
        std::memcpy(buf, p + off, len);
        ogg_sync_wrote(&oy_, long(len));
        bytes_in_ += int64_t(len);
        drain_pages();
      }
    } catch (const Error& e) {
      error_ = e.what();
      throw;
    }
  }
  void append_bytes(const std::vector<unsigned char>& b) { append_bytes(b.data(), b.size()); }

  // The decoded samples (mono, sample_rate()) not read yet.
  std::vector<float> read_pcm() {
    std::vector<float> out;
    out.swap(pcm_);
    return out;
  }
  // The same, appended to `out`; returns the number of samples appended.
  size_t read_pcm(std::vector<float>& out) {
    const size_t n = pcm_.size();
    out.insert(out.end(), pcm_.begin(), pcm_.end());
    pcm_.clear();
    return n;
  }
  size_t pending_samples() const { return pcm_.size(); }

  // End of input: throws if the bytes so far do not form a whole stream (no bytes at all,
  // headers incomplete, a page or a packet cut off). A live stream needs no end-of-stream page.
  void finish() {
    rethrow_if_failed();
    try {
      TTT_CHECK(bytes_in_ > 0, "empty (0 bytes)");
      TTT_CHECK(bytes_in_ == consumed_, "truncated: the stream ends in the middle of an Ogg page (",
                bytes_in_ - consumed_, " bytes of an incomplete page after byte ", consumed_, ")");
      TTT_CHECK(headers_ == 2, "truncated: the stream ends before its Opus headers (OpusHead, OpusTags) are complete");
      TTT_CHECK(os_.body_fill - os_.body_returned == 0, "truncated: the stream ends in the middle of a packet (",
                os_.body_fill - os_.body_returned, " bytes of a packet continued across pages)");
    } catch (const Error& e) {
      error_ = str("Ogg Opus stream: ", e.what());
      throw Error(error_);
    }
  }

  int64_t sample_rate() const { return opt_.sample_rate; }
  bool headers_done() const { return headers_ == 2; }
  const OpusStreamHeader& header() const { return header_; }  // filled once headers_done()
  bool ended() const { return eos_; }                           // the end-of-stream page was read
  bool failed() const { return !error_.empty(); }
  int64_t bytes_in() const { return bytes_in_; }
  int64_t pages() const { return pages_; }
  int64_t audio_packets() const { return audio_packets_; }
  int64_t samples_out() const { return samples_out_; }  // after trimming, read or not

 private:
  void rethrow_if_failed() const {
    if (!error_.empty()) throw Error(error_);
  }
  template <class... Args>
  [[noreturn]] void bad(Args&&... args) const {
    fail("Ogg Opus stream: ", std::forward<Args>(args)...);
  }

  // Before anything is parsed: the first four bytes must be Ogg's capture pattern, so that
  // "not Ogg at all" reads as such rather than as a lost page.
  void check_capture(const unsigned char* p, size_t len) {
    for (size_t i = 0; i < len && first_bytes_.size() < 4; ++i) first_bytes_.push_back(p[i]);
    if (capture_checked_ || first_bytes_.size() < 4) return;
    capture_checked_ = true;
    if (std::memcmp(first_bytes_.data(), "OggS", 4) != 0)
      bad("not an Ogg stream (it starts with '", detail::packet_start(first_bytes_.data(), 4),
          "', an Ogg stream with 'OggS')");
  }

  void drain_pages() {
    if (!capture_checked_) return;  // fewer than 4 bytes so far
    ogg_page og;
    for (;;) {
      const int r = ogg_sync_pageout(&oy_, &og);
      if (r == 0) return;
      if (r < 0)
        bad("corrupt Ogg page at byte ", consumed_, " (bad checksum, damaged header or bytes missing)");
      process_page(og);
      consumed_ += og.header_len + og.body_len;
    }
  }

  void process_page(ogg_page& og) {
    const long serial = ogg_page_serialno(&og);
    const long pageno = ogg_page_pageno(&og);
    if (eos_) bad("data after the end-of-stream page (a page at byte ", consumed_, "; chained streams are not supported)");
    if (!os_ok_) {
      if (!ogg_page_bos(&og)) bad("the first page (byte ", consumed_, ") does not begin a logical stream (no BOS flag)");
      TTT_CHECK(ogg_stream_init(&os_, int(serial)) == 0, "Ogg Opus stream: ogg_stream_init failed");
      os_ok_ = true;
      header_.serial = uint32_t(serial);
    } else {
      if (uint32_t(serial) != header_.serial)
        bad("a second logical stream (serial ", uint32_t(serial), ", page at byte ", consumed_, ") in a stream of serial ",
            header_.serial, "; multiplexed or chained streams are not supported");
      if (ogg_page_bos(&og)) bad("a second beginning-of-stream page at byte ", consumed_);
      if (pageno != last_pageno_ + 1)
        bad("page missing or out of order: the page at byte ", consumed_, " has sequence number ", pageno,
            ", expected ", last_pageno_ + 1);
    }
    last_pageno_ = pageno;
    if (ogg_stream_pagein(&os_, &og) != 0) bad("libogg refused the page at byte ", consumed_, " (Ogg version ",
                                                   ogg_page_version(&og), ")");
    ++pages_;

    // Every packet that completes on this page (valid until the next pagein).
    page_packets_.clear();
    ogg_packet op;
    for (;;) {
      const int r = ogg_stream_packetout(&os_, &op);
      if (r == 0) break;
      if (r < 0) bad("packet data missing before the page at byte ", consumed_);
      if (op.bytes > opt_.max_packet_bytes) packet_too_big(op.bytes);
      page_packets_.push_back(op);
    }
    // A packet continued on the next page(s) sits in libogg's buffer: bound it.
    const long partial = os_.body_fill - os_.body_returned;
    if (partial > opt_.max_packet_bytes) packet_too_big(partial);

    size_t i = 0;
    for (; i < page_packets_.size() && headers_ < 2; ++i) {
      const ogg_packet& p = page_packets_[i];
      if (headers_ == 0) read_head(p);
      else read_tags(p);
      ++headers_;
    }
    if (i < page_packets_.size()) decode_page(og, i);
    else if (ogg_page_eos(&og)) eos_ = true;
  }

  [[noreturn]] void packet_too_big(long n) const {
    bad("a packet of ", n, "+ bytes (page at byte ", consumed_, ") is over the ", opt_.max_packet_bytes,
        "-byte limit (OpusReaderOptions::max_packet_bytes); a valid Opus packet is at most 61440 bytes");
  }

  void read_head(const ogg_packet& p) {
    const unsigned char* d = p.packet;
    if (p.bytes < 8 || std::memcmp(d, "OpusHead", 8) != 0) {
      const char* codec = detail::codec_of(d, p.bytes);
      bad("not an Opus stream: the first packet starts with '", detail::packet_start(d, p.bytes), "'",
          codec ? str(" (", codec, ")") : std::string(), ", an Opus stream with 'OpusHead'");
    }
    if (p.bytes < 19) bad("OpusHead header is ", p.bytes, " bytes, shorter than the 19 RFC 7845 requires");
    header_.version = d[8];
    header_.channels = d[9];
    header_.pre_skip = int(detail::get_le16(d + 10));
    header_.input_sample_rate = detail::get_le32(d + 12);
    header_.output_gain_q8 = int(int16_t(detail::get_le16(d + 16)));
    header_.mapping_family = d[18];
    if (header_.version > 15) bad("OpusHead version ", header_.version, " is not one this reader knows (0..15)");
    if (header_.mapping_family != 0)
      bad("OpusHead channel mapping family ", header_.mapping_family, " (", header_.channels,
          " channels) is not supported: mono or stereo (family 0) only");
    if (header_.channels != 1 && header_.channels != 2)
      bad("OpusHead declares ", header_.channels, " channels; family 0 allows 1 or 2");
    int err = OPUS_OK;
    // A mono decoder for either: libopus downmixes a stereo stream itself.
    dec_.reset(opus_decoder_create(opus_int32(opt_.sample_rate), 1, &err));
    TTT_CHECK(err == OPUS_OK && dec_, "Ogg Opus stream: opus_decoder_create failed (libopus: ", opus_strerror(err), ")");
    if (header_.output_gain_q8 != 0) {
      const int r = opus_decoder_ctl(dec_.get(), OPUS_SET_GAIN(header_.output_gain_q8));
      if (r != OPUS_OK) bad("OpusHead output gain ", header_.output_gain_q8, "/256 dB refused (libopus: ", opus_strerror(r), ")");
    }
    skip_left_ = opt_.trim ? (int64_t(header_.pre_skip) + scale_ - 1) / scale_ : 0;
  }

  void read_tags(const ogg_packet& p) {
    const unsigned char* d = p.packet;
    const long n = p.bytes;
    if (n < 8 || std::memcmp(d, "OpusTags", 8) != 0)
      bad("the second packet starts with '", detail::packet_start(d, n), "', expected the 'OpusTags' header");
    long pos = 8;
    auto take_len = [&](const char* what) -> uint32_t {
      if (n - pos < 4) bad("OpusTags header is malformed: the ", what, " length runs past its end (", n, " bytes)");
      const uint32_t v = detail::get_le32(d + pos);
      pos += 4;
      return v;
    };
    const uint32_t vlen = take_len("vendor string");
    if (vlen > uint32_t(n - pos)) bad("OpusTags header is malformed: a ", vlen, "-byte vendor string in a ", n, "-byte packet");
    header_.vendor.assign(reinterpret_cast<const char*>(d + pos), vlen);
    pos += long(vlen);
    const uint32_t count = take_len("comment count");
    if (count > uint32_t(n - pos) / 4)
      bad("OpusTags header is malformed: ", count, " comments cannot fit in the ", n - pos, " bytes left");
    for (uint32_t k = 0; k < count; ++k) {
      const uint32_t len = take_len("comment");
      if (len > uint32_t(n - pos))
        bad("OpusTags header is malformed: comment ", k + 1, " of ", count, " runs past the packet's end");
      header_.comments.emplace_back(reinterpret_cast<const char*>(d + pos), len);
      pos += long(len);
    }
  }

  // The audio packets page_packets_[first..] completed on `og`: RFC 7845 4.3-4.5.
  void decode_page(ogg_page& og, size_t first) {
    const int64_t granule = ogg_page_granulepos(&og);
    const bool eos = ogg_page_eos(&og) != 0;
    int64_t page_samples = 0;  // 48 kHz
    for (size_t i = first; i < page_packets_.size(); ++i) {
      const ogg_packet& p = page_packets_[i];
      const int64_t packet_no = audio_packets_ + int64_t(i - first) + 1;
      if (p.bytes == 0) bad("Opus packet ", packet_no, " (page at byte ", consumed_, ") is empty (0 bytes)");
      const int ns = opus_packet_get_nb_samples(p.packet, opus_int32(p.bytes), 48000);
      if (ns < 0)
        bad("Opus packet ", packet_no, " (page at byte ", consumed_, ", ", p.bytes, " bytes) is corrupt (libopus: ",
            opus_strerror(ns), ")");
      if (ns > 5760)
        bad("Opus packet ", packet_no, " (page at byte ", consumed_, ") lasts ", ns / 48, " ms, over Opus's 120 ms");
      page_samples += ns;
    }
    if (!audio_started_) {
      audio_started_ = true;
      // A stream that begins partway has a larger first granule; one that claims fewer samples
      // than its first page holds is invalid unless it also ends there (4.5).
      if (granule >= 0) {
        if (granule < page_samples && !eos)
          bad("the first audio page's granule position ", granule, " is smaller than the ", page_samples,
              " samples (48 kHz) it holds (RFC 7845 4.5)");
        start_granule_ = std::max<int64_t>(0, granule - page_samples);
      }
    } else if (granule >= 0 && granule < last_granule_) {
      bad("granule position goes backwards (", last_granule_, " then ", granule, " at the page at byte ", consumed_, ")");
    }
    if (granule >= 0) last_granule_ = granule;
    // End trimming: the end-of-stream page's granule position is the stream's length.
    int64_t end_limit = -1;  // decoded samples (output rate, pre-skip included) to keep; -1: all
    if (eos && opt_.trim && granule >= 0) {
      const int64_t total48 = granule - start_granule_;
      end_limit = (total48 + scale_ / 2) / scale_;
    }
    for (size_t i = first; i < page_packets_.size(); ++i) {
      const ogg_packet& p = page_packets_[i];
      ++audio_packets_;
      const int n = opus_decode_float(dec_.get(), p.packet, opus_int32(p.bytes), decode_buf_.data(),
                                      int(decode_buf_.size()), 0);
      if (n < 0)
        bad("Opus packet ", audio_packets_, " (page at byte ", consumed_, ", ", p.bytes, " bytes) is corrupt (libopus: ",
            opus_strerror(n), ")");
      int64_t lo = 0, hi = n;
      if (end_limit >= 0) hi = std::clamp<int64_t>(end_limit - decoded_, 0, n);
      decoded_ += n;
      const int64_t skip = std::min<int64_t>(skip_left_, hi);
      skip_left_ -= skip;
      lo = skip;
      if (hi <= lo) continue;
      if (int64_t(pcm_.size()) + (hi - lo) > max_pending_)
        bad(int64_t(pcm_.size()) + (hi - lo), " decoded samples would be waiting, over the ", max_pending_, " (",
            opt_.max_pending_seconds, " s) limit (OpusReaderOptions::max_pending_seconds): call read_pcm() between "
            "append_bytes() calls");
      pcm_.insert(pcm_.end(), decode_buf_.begin() + lo, decode_buf_.begin() + hi);
      samples_out_ += hi - lo;
    }
    if (eos) eos_ = true;
  }

  OpusReaderOptions opt_;
  int64_t scale_ = 2, max_pending_ = 0;
  ogg_sync_state oy_{};
  ogg_stream_state os_{};
  bool os_ok_ = false;
  std::unique_ptr<OpusDecoder, detail::OpusDecoderDeleter> dec_;
  OpusStreamHeader header_;
  std::vector<unsigned char> first_bytes_;
  bool capture_checked_ = false;
  std::vector<ogg_packet> page_packets_;
  std::vector<float> decode_buf_, pcm_;
  std::string error_;
  int headers_ = 0;
  bool audio_started_ = false, eos_ = false;
  long last_pageno_ = -1;
  int64_t bytes_in_ = 0, consumed_ = 0, pages_ = 0, audio_packets_ = 0, samples_out_ = 0;
  int64_t start_granule_ = 0, last_granule_ = -1, decoded_ = 0, skip_left_ = 0;
};

}  // namespace ttt::io
