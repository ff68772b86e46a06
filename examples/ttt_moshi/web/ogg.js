// Ogg pages (RFC 3533) carrying Opus (RFC 7845): the framing of the audio messages (kind 1) of
// Kyutai's conversation protocol. The browser's WebCodecs AudioEncoder / AudioDecoder code bare
// Opus packets; this file wraps them into Ogg pages for the server and unwraps the server's pages.
//
//   page = "OggS" | version 0 | flags | granule (int64 LE) | serial (u32 LE) | sequence (u32 LE)
//          | CRC-32 (u32 LE) | n segments (u8) | n lacing values | the segments' bytes
//
// A packet of L bytes is laced as floor(L / 255) values of 255 followed by one value L mod 255
// (< 255; a 0 when L is a multiple of 255), so a value < 255 ends a packet; a page whose last
// value is 255 continues its last packet on the next page (flag 0x01). Flags: 0x02 begins the
// logical stream (BOS), 0x04 ends it (EOS). The granule position of an Opus page is the number of
// 48 kHz samples decoded up to the end of its last completed packet, pre-skip included.
// A classic script (no module): it defines the global TttOgg.
(function (global) {
  'use strict';

  // CRC-32 of Ogg: polynomial 0x04c11db7, most significant bit first, initial value 0, no final
  // XOR (not the zlib CRC), over the whole page with its checksum field read as zero.
  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let r = i << 24;
      for (let k = 0; k < 8; k++) r = (r & 0x80000000) ? (r << 1) ^ 0x04c11db7 : r << 1;
      t[i] = r >>> 0;
    }
    return t;
  })();

  function crc32(bytes) {
    let c = 0;
    for (let i = 0; i < bytes.length; i++) c = ((c << 8) ^ CRC_TABLE[((c >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
    return c;
  }

  const HEADER_BYTES = 27;      // fixed part of a page header, before the lacing values
  const FLAG_CONTINUED = 0x01, FLAG_BOS = 0x02, FLAG_EOS = 0x04;
  const MAX_PAGE_BYTES = HEADER_BYTES + 255 + 255 * 255;  // the largest page the format allows

  // Writes pages of one logical stream, each holding whole packets (a packet of up to 255 * 255 - 1
  // bytes fits one page; 20 ms Opus packets are a few hundred bytes at most).
  class OggWriter {
    constructor(serial) {
      this.serial = serial >>> 0;
      this.sequence = 0;
    }

    // packets: array of Uint8Array; granule: a non-negative integer (< 2^53); flags: FLAG_*.
    page(packets, granule, flags) {
      const lacing = [];
      let body = 0;
      for (const p of packets) {
        for (let n = p.length; ; n -= 255) {
          if (n >= 255) { lacing.push(255); continue; }
          lacing.push(n);
          break;
        }
        body += p.length;
      }
      if (lacing.length > 255) throw new Error(`Ogg: ${lacing.length} lacing values do not fit one page (max 255)`);
      const out = new Uint8Array(HEADER_BYTES + lacing.length + body);
      const v = new DataView(out.buffer);
      out.set([0x4f, 0x67, 0x67, 0x53], 0);  // "OggS"
      out[4] = 0;                            // stream structure version
      out[5] = flags;
      v.setUint32(6, granule % 0x100000000, true);             // granule, low 32 bits
      v.setUint32(10, Math.floor(granule / 0x100000000), true); // high 32 bits
      v.setUint32(14, this.serial, true);
      v.setUint32(18, this.sequence++, true);
      v.setUint32(22, 0, true);              // checksum, filled below
      out[26] = lacing.length;
      out.set(lacing, HEADER_BYTES);
      let at = HEADER_BYTES + lacing.length;
      for (const p of packets) { out.set(p, at); at += p.length; }
      v.setUint32(22, crc32(out), true);
      return out;
    }
  }

  // Reads pages from bytes split anywhere (a WebSocket message may end mid-page) and hands each
  // complete packet to onPacket(packet, info), info = {granule (of its page, or -1 when no packet
  // ends there), bos, eos, packetIndex}. Every damaged or out-of-order page throws an Error that
  // names its byte offset; after an error the reader stays failed (a stream cannot be resynced
  // without losing audio, and the protocol has one stream per connection).
  class OggReader {
    constructor(onPacket) {
      this.onPacket = onPacket;
      this.buf = new Uint8Array(0);
      this.consumed = 0;          // stream bytes before this.buf[0]
      this.serial = -1;
      this.nextSequence = 0;
      this.partial = [];          // segments of a packet continued on the next page
      this.packets = 0;
      this.ended = false;
      this.error = null;
    }

    push(bytes) {
      if (this.error) throw this.error;
      try {
        this.buf = concat(this.buf, bytes);
        let off = 0;
        while (this.buf.length - off >= HEADER_BYTES) {
          const n = this.pageLength(off);
          if (n < 0) break;  // the rest of this page has not arrived
          this.readPage(this.buf.subarray(off, off + n));
          this.consumed += n;
          off += n;
        }
        this.buf = this.buf.slice(off);
        if (this.buf.length > MAX_PAGE_BYTES) throw this.fail('over a page of bytes buffered without a whole page');
      } catch (e) {
        this.error = e;
        throw e;
      }
    }

    fail(what) { return new Error(`Ogg stream: ${what} (at byte ${this.consumed})`); }

    // The length of the page at buf[off], or -1 while it is incomplete.
    pageLength(off) {
      const b = this.buf;
      if (b[off] !== 0x4f || b[off + 1] !== 0x67 || b[off + 2] !== 0x67 || b[off + 3] !== 0x53)
        throw this.fail('no "OggS" capture pattern where a page should begin');
      if (b[off + 4] !== 0) throw this.fail(`Ogg version ${b[off + 4]} (only 0 exists)`);
      const nseg = b[off + 26];
      if (b.length - off < HEADER_BYTES + nseg) return -1;
      let body = 0;
      for (let i = 0; i < nseg; i++) body += b[off + HEADER_BYTES + i];
      const n = HEADER_BYTES + nseg + body;
      return b.length - off < n ? -1 : n;
    }

    readPage(page) {
      const v = new DataView(page.buffer, page.byteOffset, page.byteLength);
      const flags = page[5];
      const granule = v.getInt32(10, true) * 0x100000000 + v.getUint32(6, true);  // -1 reads as -1
      const serial = v.getUint32(14, true), sequence = v.getUint32(18, true), crc = v.getUint32(22, true);
      const check = page.slice();
      check[22] = check[23] = check[24] = check[25] = 0;
      if (crc32(check) !== crc) throw this.fail('bad page checksum (damaged or truncated page)');
      if (this.ended) throw this.fail('a page after the end-of-stream page');
      if (this.serial < 0) {
        if (!(flags & FLAG_BOS)) throw this.fail('the first page does not begin a stream (no BOS flag)');
        this.serial = serial;
      } else if (serial !== this.serial) {
        throw this.fail(`a page of another logical stream (serial ${serial}, expected ${this.serial})`);
      } else if (flags & FLAG_BOS) {
        throw this.fail('a second beginning-of-stream page');
      }
      if (sequence !== this.nextSequence)
        throw this.fail(`page ${sequence} where page ${this.nextSequence} was expected (missing or out of order)`);
      this.nextSequence = sequence + 1;
      if (!!(flags & FLAG_CONTINUED) !== (this.partial.length > 0))
        throw this.fail('continuation flag disagrees with the previous page');

      const nseg = page[26];
      let at = HEADER_BYTES + nseg;
      const done = [];
      for (let i = 0; i < nseg; i++) {
        const len = page[HEADER_BYTES + i];
        this.partial.push(page.subarray(at, at + len));
        at += len;
        if (len < 255) { done.push(concatAll(this.partial)); this.partial = []; }
      }
      this.ended = !!(flags & FLAG_EOS);
      done.forEach((p, i) => this.onPacket(p, {
        granule: i === done.length - 1 ? granule : -1,
        bos: !!(flags & FLAG_BOS), eos: this.ended, packetIndex: this.packets++,
      }));
    }
  }

  function concat(a, b) {
    if (a.length === 0) return b.slice();
    const out = new Uint8Array(a.length + b.length);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  function concatAll(parts) {
    if (parts.length === 1) return parts[0].slice();
    const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  // The duration of an Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 3.1): the
  // configuration (bits 7..3) gives the frame size, the code (bits 1..0) the number of frames
  // (1, 2, 2, or the count in the next byte for code 3). Returns -1 for a malformed packet.
  function opusPacketSamples(p) {
    if (p.length < 1) return -1;
    const config = p[0] >> 3, code = p[0] & 3;
    let frame;
    if (config < 12) frame = [480, 960, 1920, 2880][config & 3];  // SILK: 10, 20, 40, 60 ms
    else if (config < 16) frame = [480, 960][config & 1];         // hybrid: 10, 20 ms
    else frame = [120, 240, 480, 960][config & 3];                // CELT: 2.5, 5, 10, 20 ms
    let frames = code === 0 ? 1 : 2;
    if (code === 3) {
      if (p.length < 2) return -1;
      frames = p[1] & 0x3f;
    }
    const n = frame * frames;
    return n > 5760 ? -1 : n;  // an Opus packet lasts at most 120 ms
  }

  // The RFC 7845 identification header (19 bytes, channel mapping family 0).
  function opusHead(channels, preSkip, inputRate) {
    const h = new Uint8Array(19);
    const v = new DataView(h.buffer);
    h.set(new TextEncoder().encode('OpusHead'), 0);
    h[8] = 1;                          // version
    h[9] = channels;
    v.setUint16(10, preSkip, true);    // 48 kHz samples the decoder drops at the start
    v.setUint32(12, inputRate, true);  // informational: the rate the audio was captured at
    v.setInt16(16, 0, true);           // output gain (Q7.8 dB)
    h[18] = 0;                         // mapping family 0: mono or stereo, no mapping table
    return h;
  }

  // The RFC 7845 comment header: a vendor string and no comments.
  function opusTags(vendor) {
    const vend = new TextEncoder().encode(vendor);
    const h = new Uint8Array(8 + 4 + vend.length + 4);
    const v = new DataView(h.buffer);
    h.set(new TextEncoder().encode('OpusTags'), 0);
    v.setUint32(8, vend.length, true);
    h.set(vend, 12);
    v.setUint32(12 + vend.length, 0, true);
    return h;
  }

  // Reads an OpusHead packet: {channels, preSkip, inputRate}, or throws naming the problem.
  function parseOpusHead(p) {
    const magic = new TextDecoder().decode(p.subarray(0, 8));
    if (p.length < 19 || magic !== 'OpusHead') throw new Error('Ogg Opus: the first packet is not an OpusHead header');
    const v = new DataView(p.buffer, p.byteOffset, p.byteLength);
    return { channels: p[9], preSkip: v.getUint16(10, true), inputRate: v.getUint32(12, true) };
  }

  global.TttOgg = {
    crc32, OggWriter, OggReader, opusPacketSamples, opusHead, opusTags, parseOpusHead,
    FLAG_BOS, FLAG_EOS, FLAG_CONTINUED,
  };
})(typeof window !== 'undefined' ? window : globalThis);
