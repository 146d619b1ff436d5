// Audio worklets: microphone capture and jitter-buffered playback.

class CaptureProcessor extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}

// Plays queued Float32 chunks; waits for `prebufferSamples` before starting (jitter buffer)
// and reports how many samples were played, so the page can truncate what was not heard.
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
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), i);
      i += n; this.offset += n; this.buffered -= n; this.played += n;
      if (this.offset >= head.length) { this.queue.shift(); this.offset = 0; }
    }
    if (!this.queue.length) this.started = false; // underrun: buffer again before resuming
    if (i) this.port.postMessage({ played: this.played });
    return true;
  }
}

registerProcessor("omnivox-capture", CaptureProcessor);
registerProcessor("omnivox-player", PlayerProcessor);
