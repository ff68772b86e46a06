// The conversation page: Kyutai's protocol over a WebSocket (GET api/chat; binary messages whose
// first byte is the kind), the microphone encoded to Opus by the browser's WebCodecs AudioEncoder,
// the model's Opus decoded by AudioDecoder and played through scheduled AudioBufferSources.
// Both directions are Ogg Opus, mono, 24 kHz (ogg.js does the pages). WebCodecs needs a secure
// context: https, or http on localhost / 127.0.0.1.
(function () {
  'use strict';
  const O = window.TttOgg;

  const SAMPLE_RATE = 24000;   // Mimi's rate, and the protocol's
  const CHUNK = 480;           // samples per AudioData given to the encoder: 20 ms, one Opus frame
  const PLAY_AHEAD_S = 0.08;   // a reply chunk that arrives late starts this far ahead of "now"
  const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
  const PARAMS = ['text_temperature', 'text_topk', 'audio_temperature', 'audio_topk', 'seed'];

  const $ = (id) => document.getElementById(id);
  const query = new URLSearchParams(location.search);

  // Everything the page counts, also read by the headless test (window.tttStats and the DOM).
  const stats = {
    state: 'idle', sessionId: null, resumed: false, frame: 0, sentSeconds: 0, sentPages: 0, replySamples: 0, replyRate: 0,
    replyPackets: 0, replyPeak: 0, textChars: 0, textMessages: 0, errors: 0, lastError: null,
  };
  window.tttStats = stats;

  let conn = null;  // the live connection: {ctx, ws, mic, encoder, decoder, ...}

  // The capture AudioWorklet, loaded from a Blob so that it needs nothing from the server: it
  // collects the (mono, 24 kHz) microphone samples into 20 ms chunks for the encoder.
  const CAPTURE_WORKLET = `
    class TttCapture extends AudioWorkletProcessor {
      constructor() { super(); this.buf = new Float32Array(${CHUNK}); this.n = 0; }
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];  // absent while the input is silent/unconnected
        if (ch) {
          for (let i = 0; i < ch.length; i++) {
            this.buf[this.n++] = ch[i];
            if (this.n === this.buf.length) {
              this.port.postMessage(this.buf, [this.buf.buffer]);
              this.buf = new Float32Array(${CHUNK});
              this.n = 0;
            }
          }
        }
        return true;
      }
    }
    registerProcessor('ttt-capture', TttCapture);`;

  // ---- the page ---------------------------------------------------------------------------

  function render() {
    document.body.dataset.state = stats.state;
    $('state').textContent = stats.state;
    $('session-id').textContent = stats.sessionId || '\u2013';
    $('session-note').textContent = stats.sessionId && stats.resumed ? `resumed at frame ${stats.frame}` : '';
    $('sent-seconds').textContent = stats.sentSeconds.toFixed(2);
    $('sent-pages').textContent = stats.sentPages;
    $('reply-samples').textContent = stats.replySamples;
    $('reply-rate').textContent = stats.replyRate || '\u2013';
    $('reply-seconds').textContent = (stats.replyRate ? stats.replySamples / stats.replyRate : 0).toFixed(2);
    $('reply-packets').textContent = stats.replyPackets;
    $('text-chars').textContent = stats.textChars;
    $('text-messages').textContent = stats.textMessages;
    $('error-count').textContent = stats.errors;
    $('connect').disabled = conn !== null;
    $('disconnect').disabled = conn === null;
    $('copy-session').disabled = !stats.sessionId;
  }

  function setState(s) { stats.state = s; render(); }

  function showError(msg) {
    stats.errors++;
    stats.lastError = msg;
    const e = $('error');
    e.textContent = e.hidden ? msg : e.textContent + '\n' + msg;
    e.hidden = false;
    render();
  }

  function clearError() { $('error').hidden = true; $('error').textContent = ''; }

  const rms = (x) => Math.sqrt(x.reduce((s, v) => s + v * v, 0) / Math.max(1, x.length));

  // ---- connecting -------------------------------------------------------------------------

  // ws(s)://<this host>/api/chat?<settings>[&session_id=...]: relative to the page, so it also
  // works behind a proxy that serves the page under a path.
  function chatUrl() {
    const u = new URL('api/chat', location.href);
    u.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    u.search = '';
    for (const p of PARAMS) {
      const v = $(p).value.trim();
      if (v !== '') u.searchParams.set(p, v);
    }
    const token = $('auth_token').value;
    if (token) u.searchParams.set('auth_token', token);
    const resume = $('resume').value.trim();
    if (resume) u.searchParams.set('session_id', resume);
    return u.toString();
  }

  async function connect() {
    if (conn) return;
    clearError();
    if (!('AudioEncoder' in window) || !('AudioDecoder' in window) || !window.isSecureContext) {
      showError('This page needs WebCodecs audio (AudioEncoder / AudioDecoder) in a secure context: ' +
                'a recent Chromium, Chrome, Edge or Firefox, over https or on localhost.');
      setState('error');
      return;
    }
    // Created inside the click, so that the browser lets it play (autoplay policy); at 24 kHz so
    // that the microphone arrives already resampled to the protocol's rate.
    const c = conn = {
      ctx: new AudioContext({ sampleRate: SAMPLE_RATE }), ws: null, mic: null, capture: null,
      encoder: null, decoder: null, oggOut: null, granuleOut: 0, oggIn: null, preSkipLeft: null,
      granuleIn: 0, playAt: 0, handshake: false, closing: false,
    };
    Object.assign(stats, { sessionId: null, resumed: false, frame: 0, sentSeconds: 0, sentPages: 0,
                           replySamples: 0, replyRate: 0, replyPackets: 0, replyPeak: 0, textChars: 0,
                           textMessages: 0 });
    $('transcript').textContent = '';
    setState('connecting');
    try {
      const encConfig = { codec: 'opus', sampleRate: SAMPLE_RATE, numberOfChannels: 1, bitrate: 32000,
                          opus: { frameDuration: 20000 } };
      const sup = await AudioEncoder.isConfigSupported(encConfig);
      if (!sup.supported) throw new Error('this browser cannot encode Opus at 24 kHz mono (WebCodecs)');
      c.encConfig = encConfig;
      c.mic = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (e) {
      teardown(c, `Microphone / codec: ${e.name || 'Error'}: ${e.message}`);
      return;
    }
    if (conn !== c) return;  // disconnected meanwhile
    const ws = c.ws = new WebSocket(chatUrl());
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (ev) => {
      try {
        onMessage(c, ev.data);
      } catch (e) {
        teardown(c, `Protocol error: ${e.message}`);
      }
    };
    ws.onerror = () => {};  // the close event that follows says what happened
    ws.onclose = (ev) => {
      const normal = ev.code === 1000 || ev.code === 1005 || c.closing;
      teardown(c, normal ? null : `Connection closed (code ${ev.code}${ev.reason ? ': ' + ev.reason : ''})`);
    };
  }

  function send(c, kind, payload) {
    if (!c.ws || c.ws.readyState !== WebSocket.OPEN) return;
    const m = new Uint8Array(1 + payload.length);
    m[0] = kind;
    m.set(payload, 1);
    c.ws.send(m);
  }

  function onMessage(c, data) {
    if (!(data instanceof ArrayBuffer)) throw new Error('the server sent a text frame (the protocol is binary)');
    const m = new Uint8Array(data);
    if (m.length === 0) throw new Error('an empty message');
    const kind = m[0], payload = m.subarray(1);
    if (!c.handshake && kind !== KIND.HANDSHAKE && kind !== KIND.ERROR)
      throw new Error(`the first message is of kind ${kind}, not the handshake (0)`);
    switch (kind) {
      case KIND.HANDSHAKE:
        // Kyutai's handshake: version and model bytes, both 0 today.
        c.handshake = true;
        setState('live');
        startCapture(c).catch((e) => teardown(c, `Microphone: ${e.message}`));
        break;
      case KIND.AUDIO:
        if (!c.oggIn) c.oggIn = new O.OggReader((p, info) => onPacket(c, p, info));
        c.oggIn.push(payload);
        break;
      case KIND.TEXT: {
        const s = new TextDecoder().decode(payload);
        const t = $('transcript');
        t.append(document.createTextNode(s));
        t.scrollTop = t.scrollHeight;
        stats.textChars += Array.from(s).length;
        stats.textMessages++;
        render();
        break;
      }
      case KIND.METADATA: {
        const meta = JSON.parse(new TextDecoder().decode(payload));
        // The server's conversation: its id (to resume later), whether this is a resume, and
        // its position in frames (80 ms each).
        if (meta && typeof meta.session_id === 'string') stats.sessionId = meta.session_id;
        if (meta && typeof meta.resumed === 'boolean') stats.resumed = meta.resumed;
        if (meta && Number.isInteger(meta.frame)) stats.frame = meta.frame;
        render();
        break;
      }
      case KIND.ERROR:
        showError('Server: ' + new TextDecoder().decode(payload));
        break;
      case KIND.CONTROL:
      case KIND.PING:
        break;
      default:
        throw new Error(`unknown message kind ${kind}`);
    }
  }

  // ---- microphone -> Opus -> Ogg -> server ------------------------------------------------

  async function startCapture(c) {
    c.encoder = new AudioEncoder({
      output: (chunk, meta) => onEncoded(c, chunk, meta),
      error: (e) => teardown(c, `Opus encoder: ${e.message}`),
    });
    c.encoder.configure(c.encConfig);
    const url = URL.createObjectURL(new Blob([CAPTURE_WORKLET], { type: 'application/javascript' }));
    await c.ctx.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    if (conn !== c) return;
    const source = c.ctx.createMediaStreamSource(c.mic);
    // Mono by down-mixing (channelCount 1, explicit); one output into a muted gain keeps the node
    // pulled by the graph.
    c.capture = new AudioWorkletNode(c.ctx, 'ttt-capture', {
      numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: 'explicit',
    });
    const mute = c.ctx.createGain();
    mute.gain.value = 0;
    source.connect(c.capture).connect(mute).connect(c.ctx.destination);
    let t = 0;  // microseconds of audio given to the encoder
    c.capture.port.onmessage = (ev) => {
      if (conn !== c || c.encoder.state !== 'configured') return;
      const x = ev.data;
      $('mic-level').value = Math.min(1, 4 * rms(x));
      c.encoder.encode(new AudioData({
        format: 'f32', sampleRate: SAMPLE_RATE, numberOfFrames: x.length, numberOfChannels: 1,
        timestamp: t, data: x,
      }));
      t += (x.length * 1e6) / SAMPLE_RATE;
    };
    if (c.ctx.state === 'suspended') await c.ctx.resume();
  }

  function bytesOf(buf) {
    return ArrayBuffer.isView(buf) ? new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength) : new Uint8Array(buf);
  }

  // One Opus packet from the encoder -> one Ogg page (the two header pages before the first).
  function onEncoded(c, chunk, meta) {
    if (conn !== c) return;
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const pages = [];
    if (!c.oggOut) {
      // The encoder's delay, which the decoder drops (RFC 7845 pre-skip, 48 kHz samples): the
      // browser reports it in an OpusHead description when it gives one; else libopus's usual
      // 6.5 ms (312), which is what browsers built on libopus add.
      let preSkip = 312;
      const d = meta && meta.decoderConfig && meta.decoderConfig.description;
      if (d) {
        try { preSkip = O.parseOpusHead(bytesOf(d)).preSkip; } catch (e) { /* not an OpusHead */ }
      }
      c.oggOut = new O.OggWriter((Math.random() * 0x100000000) >>> 0);
      pages.push(c.oggOut.page([O.opusHead(1, preSkip, SAMPLE_RATE)], 0, O.FLAG_BOS));
      pages.push(c.oggOut.page([O.opusTags('ttt-moshi web page (WebCodecs)')], 0, 0));
    }
    const n = O.opusPacketSamples(packet);
    if (n < 0) { teardown(c, 'Opus encoder: a malformed packet'); return; }
    c.granuleOut += n;
    pages.push(c.oggOut.page([packet], c.granuleOut, 0));
    for (const p of pages) {
      send(c, KIND.AUDIO, p);
      stats.sentPages++;
    }
    stats.sentSeconds = c.granuleOut / 48000;
    render();
  }

  // ---- server -> Ogg -> Opus -> speakers --------------------------------------------------

  function onPacket(c, p, info) {
    if (info.packetIndex === 0) {
      const head = O.parseOpusHead(p);
      if (head.channels !== 1) throw new Error(`the reply stream has ${head.channels} channels, not 1`);
      c.preSkip = head.preSkip;
      c.decoder = new AudioDecoder({
        output: (a) => onDecoded(c, a),
        error: (e) => teardown(c, `Opus decoder: ${e.message}`),
      });
      // Mono, channel mapping family 0: no description needed. Opus decodes at 48 kHz.
      c.decoder.configure({ codec: 'opus', sampleRate: 48000, numberOfChannels: 1 });
      return;
    }
    if (info.packetIndex === 1) return;  // OpusTags: nothing the page needs
    const n = O.opusPacketSamples(p);
    if (n < 0) throw new Error('a malformed Opus packet in the reply');
    c.decoder.decode(new EncodedAudioChunk({
      type: 'key', timestamp: Math.round((c.granuleIn * 1e6) / 48000), duration: Math.round((n * 1e6) / 48000), data: p,
    }));
    c.granuleIn += n;
    stats.replyPackets++;
  }

  function onDecoded(c, a) {
    const rate = a.sampleRate, n = a.numberOfFrames;
    const all = new Float32Array(n);
    a.copyTo(all, { planeIndex: 0, format: 'f32-planar' });
    a.close();
    if (conn !== c) return;
    if (c.preSkipLeft === null) c.preSkipLeft = Math.round((c.preSkip * rate) / 48000);
    const skip = Math.min(n, c.preSkipLeft);
    c.preSkipLeft -= skip;
    const pcm = all.subarray(skip);
    stats.replyRate = rate;
    if (pcm.length === 0) { render(); return; }
    stats.replySamples += pcm.length;
    for (const v of pcm) stats.replyPeak = Math.max(stats.replyPeak, Math.abs(v));
    $('reply-level').value = Math.min(1, 4 * rms(pcm));
    const buf = c.ctx.createBuffer(1, pcm.length, rate);
    buf.copyToChannel(pcm, 0);
    const src = c.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(c.ctx.destination);
    const at = Math.max(c.playAt, c.ctx.currentTime + PLAY_AHEAD_S);
    src.start(at);
    c.playAt = at + pcm.length / rate;
    render();
  }

  // ---- ending -----------------------------------------------------------------------------

  // Ends the connection c (once), with an error message or null.
  // A failure after the end (a worklet still loading, a codec callback) is not reported: the
  // first reason is the one that matters.
  function teardown(c, error) {
    if (c.closed) return;
    c.closed = true;
    if (error) showError(error);
    c.closing = true;
    if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
    if (c.capture) { c.capture.port.onmessage = null; c.capture.disconnect(); }
    if (c.mic) c.mic.getTracks().forEach((t) => t.stop());
    for (const codec of [c.encoder, c.decoder]) if (codec && codec.state !== 'closed') codec.close();
    c.ctx.close();
    if (conn === c) conn = null;
    $('mic-level').value = 0;
    $('reply-level').value = 0;
    setState(error ? 'error' : 'closed');
  }

  function disconnect() { if (conn) teardown(conn, null); }

  // ---- start --------------------------------------------------------------------------------

  for (const p of PARAMS.concat(['auth_token'])) if (query.has(p)) $(p).value = query.get(p);
  if (query.has('session_id')) $('resume').value = query.get('session_id');
  $('connect').onclick = connect;
  $('disconnect').onclick = disconnect;
  $('copy-session').onclick = () => { if (stats.sessionId) $('resume').value = stats.sessionId; };
  window.tttConnect = connect;
  window.tttDisconnect = disconnect;
  render();
  if (query.get('autostart') === '1') connect();
})();
