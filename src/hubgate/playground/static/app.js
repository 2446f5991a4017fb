/*
 * hubgate playground: a browser client of the hubgate.v1 protocol (docs/protocol.md), with
 * server-side sessions and reconnect-and-resume (docs/sessions.md).
 *
 * Model output and server messages are only ever put into the page as text nodes
 * (textContent / Text.appendData), never parsed as HTML.
 */
"use strict";

(() => {
  // List prices in USD per 1000 tokens: [input, output]. Shown costs are labelled estimates.
  const PRICES = {
    "anthropic.claude-3-5-haiku-20241022-v1:0": [0.0008, 0.004],
    "amazon.nova-lite-v1:0": [0.00006, 0.00024],
    "amazon.nova-pro-v1:0": [0.0008, 0.0032],
  };

  const SUBPROTOCOL = "hubgate.v1";
  const TOKEN_KEY = "hubgate.playground.token";
  const SESSION_KEY = "hubgate.playground.session";

  // Reconnect back-off (docs/sessions.md, "Reconnect and resume from a client"): 0.25 s doubling
  // to 5 s, times a random factor in [0.5, 1); reset once a connection has lasted 30 s.
  const BACKOFF_FIRST_MS = 250;
  const BACKOFF_MAX_MS = 5000;
  const BACKOFF_RESET_MS = 30000;
  // A request that was lost before the gateway saw it is sent again, at most this many times.
  const MAX_RESENDS = 2;

  // Close codes that reconnecting with the same token cannot fix (docs/protocol.md#close-codes).
  const FINAL_CLOSES = {
    1007: "The connection was closed because the page sent text that is not valid UTF-8.",
    1008: "The gateway closed the connection for a policy violation.",
    4401: "The gateway no longer accepts this token: it is invalid or has expired. Sign in with a fresh token to continue.",
    4403: "This tenant is disabled or unknown on the gateway.",
  };

  // ------------------------------------------------------------------ elements

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    who: $("who"),
    signOut: $("sign-out"),
    signIn: $("sign-in"),
    signInError: $("sign-in-error"),
    demo: $("demo"),
    demoTenant: $("demo-tenant"),
    useDemo: $("use-demo"),
    tokenForm: $("token-form"),
    token: $("token"),
    workspace: $("workspace"),
    settings: $("settings"),
    model: $("model"),
    system: $("system"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    notice: $("notice"),
    transcript: $("transcript"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    newChat: $("new-chat"),
  };

  // ------------------------------------------------------------------ state

  const state = {
    token: null,
    ws: null,
    // signed-out | connecting | open | draining | waiting (to reconnect) | stopped
    phase: "signed-out",
    readyOnce: false, // this token has been accepted at least once
    reconnects: 0,
    attempt: 0,
    retryTimer: null,
    stableTimer: null,
    sessionId: null,
    sessionLoaded: false, // the transcript shows what the server holds for sessionId
    sessionOp: null, // {id, kind: "create" | "get"} awaiting its `session` frame
    current: null, // the reply being received; one at a time, turns are sequential
    requests: new Map(), // request id -> unfinished request
    demoTokens: {},
  };

  // ------------------------------------------------------------------ small helpers

  function newId(prefix) {
    // getRandomValues works on plain http too (randomUUID needs a secure context).
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return prefix + "-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function gatewayUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + "/v1/stream";
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // kind: "problem" (red) or "warning" (amber).
  function setNotice(text, kind) {
    el.notice.textContent = text || "";
    el.notice.dataset.kind = kind || "problem";
    show(el.notice, Boolean(text));
  }

  function seconds(ms) {
    return (ms / 1000).toFixed(ms < 10000 ? 1 : 0) + " s";
  }

  // ------------------------------------------------------------------ connection status

  function setPhase(phase, detail) {
    state.phase = phase;
    const text = {
      "signed-out": "Signed out",
      connecting: state.readyOnce ? "Reconnecting…" : "Connecting…",
      open: "Connected",
      draining: "Server restarting…",
      waiting: "Connection lost, retrying in " + seconds(detail || 0),
      stopped: "Disconnected",
    }[phase];
    el.status.textContent = text;
    el.status.dataset.state = phase;
    el.status.dataset.reconnects = String(state.reconnects);
    updateControls();
  }

  function updateControls() {
    const idle = state.current === null;
    const canSend = state.phase === "open" && state.sessionId !== null && state.sessionOp === null && idle;
    el.send.disabled = !canSend;
    el.stop.disabled = idle || state.current.cancelRequested;
    el.newChat.disabled = !(state.phase === "open" && idle && state.sessionOp === null);
    el.model.disabled = !idle;
  }

  // ------------------------------------------------------------------ sign in and out

  function signIn(raw) {
    let token = (raw || "").trim();
    if (/^bearer\s+/i.test(token)) token = token.replace(/^bearer\s+/i, "");
    if (!token) {
      signInProblem("Paste a token first.");
      return;
    }
    if (!/^[A-Za-z0-9._~+/=-]+$/.test(token)) {
      signInProblem("That does not look like a token: a JWT has only letters, digits and . - _ characters.");
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    state.token = token;
    state.readyOnce = false;
    state.attempt = 0;
    signInProblem("");
    setNotice("");
    el.token.value = "";
    show(el.signIn, false);
    show(el.workspace, true);
    show(el.signOut, true);
    connect();
  }

  function signInProblem(text) {
    el.signInError.textContent = text;
    show(el.signInError, Boolean(text));
  }

  function signOut() {
    if (state.current !== null) send({ type: "cancel", id: state.current.id });
    setPhase("signed-out");
    closeSocket();
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(SESSION_KEY);
    state.token = null;
    state.sessionId = null;
    state.sessionLoaded = false;
    state.sessionOp = null;
    state.current = null;
    state.requests.clear();
    state.reconnects = 0;
    el.transcript.replaceChildren();
    setNotice("");
    show(el.who, false);
    show(el.signOut, false);
    show(el.workspace, false);
    show(el.signIn, true);
    setPhase("signed-out");
  }

  // Back to the sign-in form after a refusal; the conversation and unfinished replies stay, so
  // signing in again as the same user picks them up (resume is per user).
  function stopWith(message) {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    setPhase("stopped");
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    signInProblem(message);
    setNotice(message);
    show(el.signIn, true);
    show(el.signOut, false);
  }

  // ------------------------------------------------------------------ the socket

  function connect() {
    clearTimeout(state.retryTimer);
    state.retryTimer = null;
    if (state.token === null) return;
    closeSocket();
    setPhase("connecting");
    let ws;
    try {
      // The token travels in Sec-WebSocket-Protocol; the gateway selects hubgate.v1 and never
      // echoes the token (docs/protocol.md, "Subprotocol (browsers)").
      ws = new WebSocket(gatewayUrl(), [SUBPROTOCOL, "bearer." + state.token]);
    } catch (err) {
      stopWith("This token cannot be sent to the gateway (" + err.message + ").");
      return;
    }
    state.ws = ws;
    let ready = false;
    ws.onmessage = (event) => {
      if (state.ws !== ws || typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame === null || typeof frame !== "object") return;
      if (frame.type === "ready") ready = true;
      onFrame(frame);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      state.ws = null;
      onClose(event.code, ready);
    };
  }

  function closeSocket() {
    const ws = state.ws;
    state.ws = null;
    if (ws !== null && ws.readyState <= WebSocket.OPEN) ws.close(1000);
  }

  function send(message) {
    const ws = state.ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  function onClose(code, wasReady) {
    clearTimeout(state.stableTimer);
    state.sessionOp = null; // its answer is lost; asked again after the next `ready`
    if (state.phase === "signed-out" || state.phase === "stopped") return;
    for (const request of state.requests.values()) markWaiting(request);
    if (FINAL_CLOSES[code]) {
      stopWith(FINAL_CLOSES[code]);
      return;
    }
    if (!wasReady) {
      // A browser sees a refused handshake only as 1006. Ask the models endpoint with the same
      // token: it answers 401/403 with the reason when the token or tenant is the problem.
      diagnose().then((verdict) => {
        if (state.phase === "signed-out" || state.phase === "stopped") return;
        if (verdict) stopWith(verdict);
        else scheduleReconnect();
      });
      return;
    }
    scheduleReconnect();
  }

  async function diagnose() {
    const token = state.token;
    if (token === null) return null;
    let response;
    try {
      response = await fetch("/v1/models", {
        headers: { Authorization: "Bearer " + token },
        cache: "no-store",
      });
    } catch {
      return null; // unreachable: keep retrying
    }
    if (response.status !== 401 && response.status !== 403) return null;
    let reason = "";
    try {
      const body = await response.json();
      reason = body && body.error && typeof body.error.message === "string" ? body.error.message : "";
    } catch {
      reason = "";
    }
    if (response.status === 403) return "This tenant is disabled or unknown on the gateway.";
    return "The gateway refused this token" + (reason ? " (" + reason + ")" : "") + ". Paste a valid one.";
  }

  function scheduleReconnect() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** state.attempt);
    const delay = base * (0.5 + Math.random() * 0.5);
    state.attempt += 1;
    setPhase("waiting", delay);
    state.retryTimer = setTimeout(connect, delay);
  }

  window.addEventListener("online", () => {
    if (state.phase === "waiting") connect();
  });

  // ------------------------------------------------------------------ frames

  function onFrame(frame) {
    const request = typeof frame.id === "string" ? state.requests.get(frame.id) : undefined;
    if (request !== undefined && ["start", "delta", "end", "error"].includes(frame.type)) {
      onRequestFrame(request, frame);
      return;
    }
    switch (frame.type) {
      case "ready":
        onReady(frame);
        break;
      case "session":
        onSession(frame);
        break;
      case "error":
        onLooseError(frame);
        break;
      case "draining":
        setPhase("draining");
        break;
      case "budget":
        setNotice(budgetNotice(frame), "warning");
        break;
      case "auth.expiring":
        setNotice(
          "Your token expires at " + new Date(frame.expires_at * 1000).toLocaleTimeString() +
            ". Sign out and sign in with a fresh token to keep going.",
          "warning",
        );
        break;
      default:
        break; // pong, auth.ok, session.deleted, and frame types added later
    }
  }

  function onReady(frame) {
    if (state.readyOnce) state.reconnects += 1;
    state.readyOnce = true;
    fillModels(frame.models || [], frame.default_model);
    el.who.textContent = frame.tenant + " · " + frame.user;
    show(el.who, true);
    setPhase("open");
    clearTimeout(state.stableTimer);
    state.stableTimer = setTimeout(() => {
      state.attempt = 0;
    }, BACKOFF_RESET_MS);

    // Pick up every unfinished reply where it stopped (docs/sessions.md, steps 3-5).
    for (const request of state.requests.values()) {
      request.resuming = true;
      send({ type: "resume", id: request.id, after: request.lastSeq });
      if (request.cancelRequested) send({ type: "cancel", id: request.id });
    }
    if (state.sessionId === null) {
      askSession("create", {});
    } else if (!state.sessionLoaded) {
      askSession("get", { session: state.sessionId });
    }
    updateControls();
  }

  function fillModels(models, defaultModel) {
    const previous = el.model.value;
    el.model.replaceChildren(...models.map((id) => make("option", "", id)));
    for (const option of el.model.options) option.value = option.textContent;
    el.model.value = models.includes(previous) ? previous : defaultModel;
  }

  function askSession(kind, fields) {
    const id = newId("s");
    state.sessionOp = { id, kind };
    send({ type: "session." + kind, id, ...fields });
  }

  function onSession(frame) {
    const op = state.sessionOp;
    if (op === null || frame.id !== op.id) return;
    state.sessionOp = null;
    state.sessionId = frame.session;
    state.sessionLoaded = true;
    sessionStorage.setItem(SESSION_KEY, frame.session);
    if (op.kind === "get" && el.transcript.childElementCount === 0) {
      for (const message of frame.messages || []) {
        if (message.role === "user") addUserTurn(message.content);
        else {
          const view = addAssistantTurn("");
          view.text.appendData(message.content);
          view.state("done");
        }
      }
      scrollToEnd(true);
    }
    updateControls();
  }

  function onLooseError(frame) {
    const op = state.sessionOp;
    if (op !== null && frame.id === op.id) {
      state.sessionOp = null;
      if (frame.code === "session_not_found") {
        // Expired or deleted while this tab was away: start a fresh one.
        forgetSession();
        askSession("create", {});
      } else {
        setNotice(describe(frame).text);
      }
      updateControls();
      return;
    }
    // A stream_not_found answering a late cancel is harmless (docs/protocol.md, "Cancelling").
    if (frame.code === "stream_not_found") return;
    if (typeof frame.id !== "string") setNotice(describe(frame).text);
  }

  function forgetSession() {
    state.sessionId = null;
    state.sessionLoaded = false;
    sessionStorage.removeItem(SESSION_KEY);
  }

  // ------------------------------------------------------------------ requests

  function sendPrompt() {
    const text = el.prompt.value;
    if (!text.trim() || el.send.disabled) return;
    const params = readParams();
    if (params.problem) {
      setNotice(params.problem);
      return;
    }
    setNotice("");
    const id = newId("r");
    const message = {
      type: "chat",
      id,
      session: state.sessionId,
      model: el.model.value,
      messages: [{ role: "user", content: text }],
      ...params.fields,
    };
    addUserTurn(text);
    const view = addAssistantTurn(el.model.value);
    const request = {
      id,
      message,
      model: el.model.value,
      lastSeq: -1, // seq of the last frame received; -1 before any
      resuming: false,
      cancelRequested: false,
      resends: 0,
      sentAt: performance.now(),
      firstAt: null,
      view,
    };
    state.requests.set(id, request);
    state.current = request;
    el.prompt.value = "";
    send(message);
    scrollToEnd(true);
    updateControls();
  }

  function readParams() {
    const fields = {};
    const system = el.system.value;
    if (system.trim()) fields.system = system;
    const maxTokens = el.maxTokens.value.trim();
    if (maxTokens) {
      const value = Number(maxTokens);
      if (!Number.isInteger(value) || value < 1 || value > 200000) {
        return { problem: "Max tokens must be a whole number from 1 to 200000 (or empty for the tenant's default)." };
      }
      fields.max_tokens = value;
    }
    const temperature = el.temperature.value.trim();
    if (temperature) {
      const value = Number(temperature);
      if (!Number.isFinite(value) || value < 0 || value > 1) {
        return { problem: "Temperature must be a number from 0 to 1 (or empty for the model's default)." };
      }
      fields.temperature = value;
    }
    return { fields };
  }

  function stopReply() {
    const request = state.current;
    if (request === null || request.cancelRequested) return;
    request.cancelRequested = true;
    // While disconnected the cancel goes out right after the resume on the next connection.
    send({ type: "cancel", id: request.id });
    request.view.state("stopping");
    updateControls();
  }

  function onRequestFrame(request, frame) {
    const hasSeq = typeof frame.seq === "number";
    if (hasSeq) {
      // Frames at or below the last seq seen can only be repeats after a resume.
      if (frame.seq <= request.lastSeq) return;
      request.lastSeq = frame.seq;
      request.resuming = false;
    }
    switch (frame.type) {
      case "start":
        request.model = frame.model || request.model;
        request.view.model(request.model);
        request.view.state(request.cancelRequested ? "stopping" : "streaming");
        break;
      case "delta":
        if (request.firstAt === null) request.firstAt = performance.now();
        request.view.text.appendData(frame.text);
        request.view.state(request.cancelRequested ? "stopping" : "streaming");
        scrollToEnd(false);
        break;
      case "end":
        finish(request, frame);
        break;
      case "error":
        if (!hasSeq && frame.code === "stream_not_found") {
          if (request.resuming) lostOnReconnect(request);
          // otherwise it answers a cancel that crossed the reply's end: nothing to do
          return;
        }
        fail(request, frame);
        break;
      default:
        break;
    }
  }

  // A resume found nothing to continue (docs/sessions.md, step 6).
  function lostOnReconnect(request) {
    request.resuming = false;
    if (request.lastSeq < 0 && !request.cancelRequested && request.resends < MAX_RESENDS) {
      // Nothing of it was shown: the gateway never saw the chat. Send it again, with a new id.
      state.requests.delete(request.id);
      request.id = newId("r");
      request.message = { ...request.message, id: request.id };
      request.resends += 1;
      state.requests.set(request.id, request);
      send(request.message);
      return;
    }
    if (request.cancelRequested) {
      done(request);
      request.view.state("cancelled");
      request.view.stopReason("cancelled");
      return;
    }
    fail(request, {
      code: "resume_lost",
      message: "The connection dropped and the rest of this reply could not be recovered. Send the message again if you still need it.",
    });
  }

  function markWaiting(request) {
    request.view.state("reconnecting");
  }

  function done(request) {
    state.requests.delete(request.id);
    if (state.current === request) state.current = null;
    updateControls();
  }

  function finish(request, end) {
    done(request);
    const usage = end.usage || {};
    const metrics = end.metrics || {};
    const ttft = typeof metrics.ttft_ms === "number"
      ? metrics.ttft_ms
      : request.firstAt !== null ? request.firstAt - request.sentAt : null;
    request.view.meta({
      ttft,
      inputTokens: usage.input_tokens,
      outputTokens: usage.output_tokens,
      cost: estimateCost(request.model, usage.input_tokens, usage.output_tokens),
    });
    request.view.stopReason(end.stop_reason);
    request.view.state(end.stop_reason === "cancelled" ? "cancelled" : "done");
    scrollToEnd(false);
  }

  function fail(request, frame) {
    done(request);
    const described = describe(frame);
    request.view.error(described);
    request.view.stopReason(frame.code);
    request.view.state("error");
    if (frame.code === "session_not_found") {
      // Nothing of the old conversation can be used any more; the next message starts a new one.
      forgetSession();
      el.transcript.dataset.expired = "true";
      if (state.phase === "open") askSession("create", {});
    }
    scrollToEnd(false);
  }

  function estimateCost(model, inputTokens, outputTokens) {
    const price = PRICES[model];
    if (!price || typeof inputTokens !== "number" || typeof outputTokens !== "number") return null;
    return (inputTokens / 1000) * price[0] + (outputTokens / 1000) * price[1];
  }

  // ------------------------------------------------------------------ errors in plain words

  function describe(frame) {
    const retry = typeof frame.retry_after === "number" ? frame.retry_after : null;
    const server = typeof frame.message === "string" ? frame.message : "";
    switch (frame.code) {
      case "rate_limited":
        return retry === null
          ? { text: "This tenant or user may not send requests at all right now (its request limit is zero)." }
          : { text: "Too many requests: the request rate of your tenant or user is used up.", retry };
      case "token_rate_limited":
        return retry === null
          ? { text: "This tenant may not use any tokens right now (its token limit is zero)." }
          : {
              text: "Your tenant's token allowance for this minute is used up. A smaller Max tokens may be let through sooner.",
              retry,
            };
      case "budget_exhausted":
        return {
          text: "Your tenant's monthly budget is spent. Requests are accepted again when the next month begins (the 1st, 00:00 UTC) or when the budget is raised.",
        };
      case "model_not_allowed":
        return { text: "This model is not available to your tenant. Choose another one in Settings." };
      case "upstream_throttled":
        return { text: "Bedrock is busy and refused the request (throttled). Try again in a little while." };
      case "upstream_timeout":
        return { text: "The model took too long to answer. Try again, perhaps with a shorter prompt or fewer max tokens." };
      case "upstream_error":
        return { text: "Bedrock refused the request or the reply broke off" + (server ? ": " + server : ".") };
      case "session_not_found":
        return { text: "This conversation is no longer stored on the server (it expired or was deleted). Your next message starts a new conversation." };
      case "too_many_streams":
        return { text: "Too many replies are running at once for your tenant. Try again in a moment." };
      case "limiter_unavailable":
        return { text: "The gateway cannot check its rate limits right now. Try again in a few seconds." };
      case "token_expired":
        return { text: "Your token has expired. Sign out and sign in with a fresh token." };
      case "invalid_message":
        return { text: "The gateway did not accept this message" + (server ? ": " + server : ".") };
      case "duplicate_id":
        return { text: "The gateway already has a request with this id. Send the message again." };
      case "resume_lost":
        return { text: server };
      default:
        return { text: "The gateway answered " + String(frame.code) + (server ? ": " + server : ".") };
    }
  }

  // The tenant crossed 80% or 95% of its monthly budget (docs/protocol.md, `budget`).
  function budgetNotice(frame) {
    const spent = [];
    if (typeof frame.monthly_budget_usd === "number" && typeof frame.spent_usd === "number") {
      spent.push("$" + frame.spent_usd.toFixed(2) + " of $" + frame.monthly_budget_usd.toFixed(2));
    }
    if (typeof frame.monthly_budget_tokens === "number" && typeof frame.spent_tokens === "number") {
      spent.push(frame.spent_tokens + " of " + frame.monthly_budget_tokens + " tokens");
    }
    const share = typeof frame.used === "number" ? Math.floor(frame.used * 100 + 1e-9) + "%" : "most";
    return (
      "Your tenant has used " + share + " of its monthly budget" +
      (spent.length ? " (" + spent.join(", ") + ")" : "") +
      ". New requests are refused once it is spent."
    );
  }

  // Live "you can send again in N s" counters, one timer for all of them.
  const countdowns = new Set();
  let countdownTimer = null;

  function startCountdown(node, retryAfterSeconds) {
    countdowns.add({ node, deadline: performance.now() + retryAfterSeconds * 1000 });
    tickCountdowns();
    if (countdownTimer === null) countdownTimer = setInterval(tickCountdowns, 250);
  }

  function tickCountdowns() {
    const now = performance.now();
    for (const item of countdowns) {
      const left = Math.ceil((item.deadline - now) / 1000);
      if (left > 0) {
        item.node.textContent = "You can send again in " + left + " s.";
        item.node.dataset.seconds = String(left);
      } else {
        item.node.textContent = "You can send again now.";
        item.node.dataset.seconds = "0";
        countdowns.delete(item);
      }
    }
    if (countdowns.size === 0 && countdownTimer !== null) {
      clearInterval(countdownTimer);
      countdownTimer = null;
    }
  }

  // ------------------------------------------------------------------ transcript

  function addUserTurn(content) {
    const item = make("li", "turn user");
    item.append(make("p", "role", "You"), make("p", "text", content));
    el.transcript.append(item);
  }

  function addAssistantTurn(model) {
    const item = make("li", "turn assistant");
    item.dataset.state = "waiting";
    const role = make("p", "role", model || "assistant");
    const body = make("p", "text");
    const text = document.createTextNode("");
    body.append(text);
    const meta = make("p", "meta");
    meta.hidden = true;
    const problem = make("div", "problem");
    problem.hidden = true;
    item.append(role, body, meta, problem);
    el.transcript.append(item);

    return {
      text,
      state(value) {
        item.dataset.state = value;
      },
      model(value) {
        role.textContent = value;
      },
      meta({ ttft, inputTokens, outputTokens, cost }) {
        const parts = [];
        if (typeof ttft === "number") parts.push(field("ttft", "first token " + Math.round(ttft) + " ms"));
        if (typeof inputTokens === "number") {
          parts.push(field("tokens", inputTokens + " in · " + outputTokens + " out"));
        }
        const costText = cost === null ? "cost unknown for this model" : "$" + cost.toFixed(6) + " (estimate)";
        const costNode = field("cost", costText);
        if (cost !== null) costNode.dataset.usd = String(cost);
        parts.push(costNode);
        meta.replaceChildren(...parts, meta.querySelector(".stop-reason") || field("stop-reason", ""));
        meta.hidden = false;
      },
      stopReason(value) {
        let node = meta.querySelector(".stop-reason");
        if (node === null) {
          node = field("stop-reason", "");
          meta.append(node);
        }
        node.textContent = String(value);
        meta.hidden = false;
      },
      error({ text: message, retry }) {
        problem.replaceChildren(make("p", "", message));
        if (typeof retry === "number") {
          const counter = make("p", "countdown");
          problem.append(counter);
          startCountdown(counter, retry);
        }
        problem.hidden = false;
      },
    };
  }

  function field(name, text) {
    return make("span", name, text);
  }

  function scrollToEnd(force) {
    const box = el.transcript;
    const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    if (force || nearEnd) box.scrollTop = box.scrollHeight;
  }

  function newChat() {
    if (state.current !== null || state.phase !== "open") return;
    // With an id, so that a session_not_found (it had expired already) is not shown as a problem.
    if (state.sessionId !== null) send({ type: "session.delete", id: newId("d"), session: state.sessionId });
    forgetSession();
    el.transcript.replaceChildren();
    delete el.transcript.dataset.expired;
    setNotice("");
    askSession("create", {});
    updateControls();
    el.prompt.focus();
  }

  // ------------------------------------------------------------------ demo tokens

  async function loadDemoTokens() {
    let tokens;
    try {
      const response = await fetch("/playground/dev-tokens", { cache: "no-store" });
      if (!response.ok) return;
      tokens = await response.json();
    } catch {
      return;
    }
    if (tokens === null || typeof tokens !== "object") return;
    state.demoTokens = tokens;
    const names = Object.keys(tokens).filter((name) => typeof tokens[name] === "string");
    if (names.length === 0) return;
    el.demoTenant.replaceChildren(...names.map((name) => make("option", "", name)));
    for (const option of el.demoTenant.options) option.value = option.textContent;
    show(el.demo, true);
  }

  // ------------------------------------------------------------------ wiring

  el.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    signIn(el.token.value);
  });
  el.useDemo.addEventListener("click", () => signIn(state.demoTokens[el.demoTenant.value]));
  el.signOut.addEventListener("click", signOut);
  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendPrompt();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendPrompt();
    }
  });
  el.stop.addEventListener("click", stopReply);
  el.newChat.addEventListener("click", newChat);

  if (window.matchMedia("(max-width: 720px)").matches) el.settings.open = false;
  loadDemoTokens();
  state.sessionId = sessionStorage.getItem(SESSION_KEY);
  const stored = sessionStorage.getItem(TOKEN_KEY);
  if (stored) signIn(stored);
  else setPhase("signed-out");
})();
