// The control badge and the tile texts of a robot state (frontend/console/ui.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { controlBadge, countersText, episodeText, esc, mismatchText, operatorOf, stateWord } from "../../frontend/console/ui.js";

const base = { name: "sim-01", connected: true, state: "running", control_source: "policy", policy_version: 7, lease: null,
  estopped: false, deadman: false, operator: "" };

test("control badge: e-stop wins, then offline, operator (deadman), simulated operator, policy version", () => {
  assert.deepEqual(controlBadge({ ...base, estopped: true, lease: { id: 1, operator: "op1" } }).text, "E-STOPPED");
  assert.equal(controlBadge({ ...base, state: "estopped" }).cls, "estopped");
  assert.equal(controlBadge({ ...base, connected: false }).cls, "offline");
  assert.deepEqual(controlBadge({ ...base, lease: { id: 3, operator: "op1" } }).text, "operator op1");
  assert.equal(controlBadge({ ...base, control_source: "operator", operator: "op2", deadman: true }).cls, "deadman");
  assert.equal(controlBadge({ ...base, control_source: "sim_operator" }).text, "simulated operator");
  assert.equal(controlBadge(base).text, "policy v7");
  assert.equal(controlBadge({ ...base, policy_version: null, policy_name: "scripted" }).text, "policy scripted");
  assert.equal(controlBadge(null).text, "–");
});

test("texts: state word, episode, counters, operator, escaping", () => {
  assert.equal(stateWord({ ...base, connected: false }), "offline");
  assert.equal(stateWord({ ...base, estopped: true }), "estopped");
  assert.equal(episodeText({ ...base, current_episode: "0123456789abcdef", current_step: 42 }), "01234567 · step 42");
  assert.equal(episodeText(base), "–");
  assert.equal(countersText({ episodes_today: 12, success_rate_today: 0.583, interventions_today: 1 }),
    "12 episodes today · 58% success · 1 intervention");
  assert.equal(countersText({ episodes_today: 0, success_rate_today: null, interventions_today: 0 }),
    "0 episodes today · – success · 0 interventions");
  assert.equal(operatorOf({ lease: null, operator: "", operator_name: "op3" }), "op3");
  assert.equal(esc(`<a href="x">'&`), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;");
});

test("an e-stop the robot has not confirmed says so, and mismatches read as one warning line", () => {
  const latched = { ...base, estopped: true, estopped_by: "op1" };
  assert.equal(controlBadge({ ...latched, reported_estopped: true }).text, "E-STOPPED");
  const pending = controlBadge({ ...latched, reported_estopped: false });
  assert.equal(pending.text, "E-STOP NOT CONFIRMED");
  assert.match(pending.cls, /mismatch/);
  assert.equal(controlBadge({ ...latched, connected: false, reported_estopped: false }).text, "E-STOPPED");
  assert.equal(mismatchText({ ...base, mismatch: ["a", "b"] }), "⚠ a · b");
  assert.equal(mismatchText({ ...base, mismatch: [] }), "");
  assert.equal(mismatchText({ ...base, connected: false, mismatch: ["a"] }), "");
});
