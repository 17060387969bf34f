// The console socket (/ws/console/, docs/console.md): one per page, reconnecting with backoff, dispatching by type.
//
//   const socket = new ConsoleSocket();           // ws:// or wss:// from location
//   socket.on("robot.state", (msg) => ...);       // returns an unsubscribe function
//   socket.on("hello", (hello) => ...);           // hello: user, role, ice_servers, lease_timeout_s, deadman_ms, robots
//   socket.onStatus((status) => ...);             // "connecting" | "open" | "closed"
//   socket.send({type: "takeover", robot, reason});
//   socket.bindIndicator(element);                // a small live/offline dot + text
//   socket.start();
//
// No DOM access at import time: node's test runner imports this module.

export const PING_MS = 15000; // keeps idle proxies from closing the socket and measures the server round trip

export function consoleUrl(loc = globalThis.location, path = "/ws/console/") {
  const scheme = loc && loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc ? loc.host : "localhost"}${path}`;
}

/** Exponential backoff with jitter: attempt 0 -> ~base, doubling up to max (milliseconds). */
export function backoffDelay(attempt, { base = 500, max = 15000, jitter = 0.3, random = Math.random } = {}) {
  const raw = Math.min(max, base * 2 ** Math.max(0, attempt));
  return Math.round(raw * (1 - jitter + 2 * jitter * random()));
}

export class ConsoleSocket {
  constructor({ url, WebSocketImpl, backoff = {}, pingMs = PING_MS } = {}) {
    this.url = url || consoleUrl();
    this.WebSocketImpl = WebSocketImpl || globalThis.WebSocket;
    this.backoff = backoff;
    this.pingMs = pingMs;
    this.ws = null;
    this.status = "closed";
    this.hello = null; // the latest hello (a reconnect brings a fresh one)
    this.serverRttMs = null;
    this.attempt = 0;
    this.handlers = new Map(); // type -> Set(fn); "*" gets every message
    this.statusHandlers = new Set();
    this._timer = null;
    this._pingTimer = null;
    this._stopped = true;
  }

  get connected() { return this.status === "open"; }
  get role() { return this.hello ? this.hello.role : null; }
  get user() { return this.hello ? this.hello.user : null; }
  get iceServers() { return (this.hello && this.hello.ice_servers) || []; }
  get leaseTimeoutS() { return (this.hello && this.hello.lease_timeout_s) || 5; }
  get deadmanMs() { return (this.hello && this.hello.deadman_ms) || 250; }

  on(type, fn) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(fn);
    // a late subscriber to hello still gets the current one
    if (type === "hello" && this.hello) queueMicrotask(() => fn(this.hello));
    return () => this.handlers.get(type)?.delete(fn);
  }

  onStatus(fn) {
    this.statusHandlers.add(fn);
    fn(this.status);
    return () => this.statusHandlers.delete(fn);
  }

  start() {
    this._stopped = false;
    if (!this.ws) this._connect();
    return this;
  }

  stop() {
    this._stopped = true;
    clearTimeout(this._timer);
    clearInterval(this._pingTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      try { ws.close(1000, "page closed"); } catch { /* already closed */ }
    }
    this._setStatus("closed");
  }

  /** Sends a message object; false if the socket is not open (the caller decides whether that matters). */
  send(msg) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1 /* OPEN */) return false;
    try {
      ws.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  /** Resolves with the next message of `type` that `match` accepts, or rejects after timeoutMs. */
  waitFor(type, match = () => true, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const off = this.on(type, (msg) => {
        if (!match(msg)) return;
        clearTimeout(timer);
        off();
        resolve(msg);
      });
      const timer = setTimeout(() => { off(); reject(new Error(`no ${type} within ${timeoutMs} ms`)); }, timeoutMs);
    });
  }

  bindIndicator(el) {
    if (!el) return () => {};
    return this.onStatus((status) => {
      el.dataset.status = status;
      el.classList.remove("open", "connecting", "closed");
      el.classList.add(status);
      const text = { open: "live", connecting: "connecting…", closed: "offline, reconnecting…" }[status] || status;
      const rtt = status === "open" && this.serverRttMs !== null ? ` · ${Math.round(this.serverRttMs)} ms` : "";
      el.textContent = text + rtt;
      el.title = status === "open" ? `console socket connected as ${this.user ?? "?"} (${this.role ?? "?"})` : "console socket down";
    });
  }

  dispatch(msg) {
    if (!msg || typeof msg.type !== "string") return;
    // A large fleet's hello comes in parts: the hello with `more`, then robot.list frames until one without.
    // Subscribers see one complete hello.
    if (msg.type === "hello" && msg.more) {
      this._partialHello = { ...msg, robots: [...(msg.robots || [])] };
      return;
    }
    if (msg.type === "robot.list") {
      if (!this._partialHello) return;
      this._partialHello.robots.push(...(msg.robots || []));
      if (msg.more) return;
      msg = { ...this._partialHello, more: false };
      this._partialHello = null;
    }
    if (msg.type === "hello") {
      this.hello = msg;
      this.attempt = 0; // a full handshake: the next outage starts from the shortest delay again
    } else if (msg.type === "pong" && typeof msg.t === "number") {
      this.serverRttMs = Date.now() - msg.t;
    }
    for (const type of [msg.type, "*"]) {
      for (const fn of [...(this.handlers.get(type) || [])]) {
        try {
          fn(msg);
        } catch (err) {
          console.error(`console socket: handler for ${msg.type} failed`, err);
        }
      }
    }
  }

  _setStatus(status) {
    if (status === this.status) return;
    this.status = status;
    for (const fn of [...this.statusHandlers]) {
      try { fn(status); } catch (err) { console.error(err); }
    }
  }

  _connect() {
    clearTimeout(this._timer);
    this._setStatus("connecting");
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url);
    } catch (err) {
      console.error("console socket: cannot connect", err);
      this._scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this._setStatus("open");
      clearInterval(this._pingTimer);
      this._pingTimer = setInterval(() => this.send({ type: "ping", t: Date.now() }), this.pingMs);
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        console.warn("console socket: not JSON", event.data);
        return;
      }
      this.dispatch(msg);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      clearInterval(this._pingTimer);
      this._setStatus("closed");
      this.dispatch({ type: "socket.closed" }); // pseudo message: leases and offers die with the socket
      if (!this._stopped) this._scheduleReconnect();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  _scheduleReconnect() {
    clearTimeout(this._timer);
    const delay = backoffDelay(this.attempt++, this.backoff);
    this._timer = setTimeout(() => { if (!this._stopped) this._connect(); }, delay);
  }
}

/** The page's one socket (created on first use). A role change (an admin promoted or demoted this user) reloads the
 * page: buttons, video sessions and leases all follow the role, and the server already closed the old sessions. */
let shared = null;
export function sharedSocket() {
  if (!shared) {
    shared = new ConsoleSocket().start();
    shared.on("role", () => window.location.reload());
  }
  return shared;
}
