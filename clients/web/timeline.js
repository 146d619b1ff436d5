// A live strip of the last WINDOW_MS for demos of duplex interruption: the user's speech (mic
// level, and the turns the server detected), the assistant's audio as the page played it, and
// each interrupt with what was heard and how many ms the audio took to stop.

export const WINDOW_MS = 10000;

const MIC_SPEECH = 0.02; // mic RMS that counts as speech
const TURN_QUIET_MS = 1000; // a turn the server left open ends after this much quiet at the mic

const COLORS = { you: "#38f", turn: "#38f3", omni: "#2a4", mark: "#d22", text: "#666", label: "#fffc" };

export class Timeline {
  constructor(canvas) {
    this.canvas = canvas;
    this.samples = []; // { t, mic, out }: the loudest level of each tick
    this.turns = []; // { start, end }: the server's speech_started .. speech_stopped (page clock)
    this.marks = []; // { t, label, stopMs }: stopMs undefined while measuring, null if it never stopped
    this.mic = 0;
    this.out = 0;
    this.lastSpeech = -Infinity;
  }

  micLevel(v) { this.mic = Math.max(this.mic, v); }
  outLevel(v) { this.out = Math.max(this.out, v); }

  speechStarted(t) {
    this.speechStopped(t); // a turn the server never closed (an interrupt's command) ends here
    this.turns.push({ start: t, end: null });
  }
  speechStopped(t) {
    const last = this.turns[this.turns.length - 1];
    if (last && last.end === null) last.end = t;
  }

  mark(t, label) {
    const m = { t, label, stopMs: undefined };
    this.marks.push(m);
    return m;
  }

  // Called every tick: keep the loudest levels seen since the last one, forget what scrolled out.
  tick(now) {
    this.samples.push({ t: now, mic: this.mic, out: this.out });
    if (this.mic >= MIC_SPEECH) this.lastSpeech = now;
    // An interrupt's speech_started comes with no speech_stopped: close it when the mic is quiet.
    const open = this.turns[this.turns.length - 1];
    if (open && open.end === null && now - Math.max(open.start, this.lastSpeech) > TURN_QUIET_MS) {
      open.end = Math.max(open.start, this.lastSpeech);
    }
    this.mic = this.out = 0;
    const since = now - WINDOW_MS - 1000;
    while (this.samples.length && this.samples[0].t < since) this.samples.shift();
    while (this.turns.length && this.turns[0].end !== null && this.turns[0].end < since) this.turns.shift();
    while (this.marks.length > 1 && this.marks[0].t < since && this.marks[0].stopMs !== undefined) this.marks.shift();
  }

  draw(now) {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(c.clientWidth * dpr), h = Math.round(c.clientHeight * dpr);
    if (!w || !h) return;
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    const g = c.getContext("2d");
    g.clearRect(0, 0, w, h);
    const x = (t) => w - ((now - t) / WINDOW_MS) * w;
    const lane = h * 0.42, gap = h * 0.08; // "you" on top, "omni" below
    const bar = Math.max(1, w / (WINDOW_MS / 50));
    g.fillStyle = COLORS.turn;
    for (const s of this.turns) g.fillRect(x(s.start), 0, x(s.end === null ? now : s.end) - x(s.start), lane);
    for (const s of this.samples) {
      const mic = Math.min(1, s.mic * 4) * lane, out = Math.min(1, s.out * 4) * lane;
      g.fillStyle = COLORS.you;
      g.fillRect(x(s.t) - bar, lane - mic, bar, mic);
      g.fillStyle = COLORS.omni;
      g.fillRect(x(s.t) - bar, lane + gap, bar, out);
    }
    g.font = `${11 * dpr}px system-ui, sans-serif`;
    for (const [text, y] of [["you", 12 * dpr], ["omni", lane + gap + 12 * dpr]]) {
      g.fillStyle = COLORS.label;
      g.fillRect(dpr, y - 10 * dpr, g.measureText(text).width + 4 * dpr, 13 * dpr);
      g.fillStyle = COLORS.text;
      g.fillText(text, 3 * dpr, y);
    }
    for (let s = Math.ceil((now - WINDOW_MS) / 1000) * 1000; s <= now; s += 1000) g.fillRect(x(s), h - 3 * dpr, dpr, 3 * dpr);
    for (const m of this.marks) {
      const mx = x(m.t);
      g.fillStyle = COLORS.mark;
      g.fillRect(mx - dpr, 0, 2 * dpr, h);
      const ms = m.stopMs === undefined ? "…" : m.stopMs === null ? "did not stop" : `${m.stopMs} ms`;
      const text = `${m.label} · ${ms}`;
      const tw = g.measureText(text).width;
      g.fillText(text, Math.min(mx + 3 * dpr, w - tw - 2 * dpr), lane + gap / 2 + 4 * dpr);
    }
  }
}
