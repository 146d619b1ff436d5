// Audio worklets: microphone capture, jitter-buffered playback and a level meter.

class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}

// Plays queued Float32 chunks; waits for `prebufferSamples` before starting (jitter buffer)
// and reports how many samples were played (so the page can truncate what was not heard) and
// the level of what it played (the timeline and the time to first audio use what was heard).
class PlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.queue = [];
    this.offset = 0;
    this.buffered = 0;
    this.played = 0;
    this.started = false;
    this.prebuffer = (options.processorOptions && options.processorOptions.prebufferSamples) || 4800;
    this.port.onmessage = (e) => {
      if (e.data === "flush") {
        this.queue = []; this.offset = 0; this.buffered = 0; this.started = false;
        this.port.postMessage({ played: this.played, flushed: true });
        return;
      }
      this.queue.push(e.data);
      this.buffered += e.data.length;
    };
  }
  process(_inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (!this.started && this.buffered >= this.prebuffer) this.started = true;
    if (!this.started) return true;
    let i = 0;
    let sum = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      const chunk = head.subarray(this.offset, this.offset + n);
      out.set(chunk, i);
      for (let k = 0; k < n; k++) sum += chunk[k] * chunk[k];
      i += n; this.offset += n; this.buffered -= n; this.played += n;
      if (this.offset >= head.length) { this.queue.shift(); this.offset = 0; }
    }
    if (!this.queue.length) this.started = false; // underrun: buffer again before resuming
    if (i) this.port.postMessage({ played: this.played, level: Math.sqrt(sum / out.length) });
    return true;
  }
}

// RMS level of its input every ~20 ms (the WebRTC answer as the page plays it).
class MeterProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.sum = 0;
    this.n = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    const len = channel ? channel.length : 128;
    for (let i = 0; channel && i < len; i++) this.sum += channel[i] * channel[i];
    this.n += len;
    if (this.n >= sampleRate / 50) {
      this.port.postMessage(Math.sqrt(this.sum / this.n));
      this.sum = 0;
      this.n = 0;
    }
    return true;
  }
}

registerProcessor("omnivox-capture", CaptureProcessor);
registerProcessor("omnivox-player", PlayerProcessor);
registerProcessor("omnivox-meter", MeterProcessor);
