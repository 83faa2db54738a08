// RabbitMQ topic matching, the same rules as bridge/topic.py (tested on the same cases).
// "" has no words; "*" is exactly one word (maybe empty); "#" is zero or more words.
"use strict";

function topicWords(key) {
  return key === "" ? [] : key.split(".");
}

function topicMatches(pattern, key) {
  const pat = topicWords(pattern);
  const ks = topicWords(key);
  let reach = [true];
  for (let j = 0; j < ks.length; j++) reach.push(false);
  for (const word of pat) {
    if (word === "#") {
      let seen = false;
      for (let j = 0; j <= ks.length; j++) {
        seen = seen || reach[j];
        reach[j] = seen;
      }
    } else {
      const next = [false];
      for (let j = 1; j <= ks.length; j++) {
        next.push(reach[j - 1] && (word === "*" || word === ks[j - 1]));
      }
      reach = next;
    }
  }
  return reach[ks.length];
}

if (typeof module !== "undefined") {
  module.exports = { topicMatches, topicWords };
}
