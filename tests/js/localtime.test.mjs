// Server timestamps shown in the browser's time zone (frontend/pages/localtime.js).
import { test } from "node:test";
import assert from "node:assert/strict";
import { localText } from "../../frontend/pages/localtime.js";

test("the server's Django-style formats are rendered from the local clock fields", () => {
  const date = new Date(2026, 11, 5, 7, 3, 9);  // local time
  assert.equal(localText(date, "Y-m-d H:i:s"), "2026-12-05 07:03:09");
  assert.equal(localText(date, "m-d H:i"), "12-05 07:03");
  assert.equal(localText(date, "Y-m-d H:i"), "2026-12-05 07:03");
});

test("a UTC instant becomes the same local wall clock the Date object reports", () => {
  const date = new Date("2026-12-05T22:10:00Z");
  const expected = `${String(date.getHours()).padStart(2, "0")}:${String(date.getMinutes()).padStart(2, "0")}`;
  assert.equal(localText(date, "H:i"), expected);
});
