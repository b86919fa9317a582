/* djstm live values: follow DVars over the djstm websocket (djstm.consumers.DVarConsumer).
 *
 * Mark elements:  <span data-djstm-store="shop" data-djstm-name="price">12</span>
 * Then:           <script src="{% static 'djstm/live.js' %}" data-url="/ws/djstm/"></script>
 * Each change replaces the element's text (never its HTML; non-string values are shown as JSON) and
 * dispatches a "djstm:change" event ({store, name, version, value} in event.detail) on the element,
 * and on document for every change. The socket reconnects with growing delays and tells the server
 * which versions it has, so only what changed meanwhile is sent again; an older version never
 * replaces a newer one.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  var path = (script && script.dataset.url) || "/ws/djstm/";
  var versions = {};   // "store:name" -> version shown
  var delay = 500;     // ms before the next reconnect; doubles up to 30 s, back to 500 ms once connected

  function key(store, name) { return store + ":" + name; }

  function bound() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-djstm-store][data-djstm-name]"));
  }

  function subscriptions() {
    var seen = {}, list = [];
    bound().forEach(function (element) {
      var k = key(element.dataset.djstmStore, element.dataset.djstmName);
      if (!seen[k]) { seen[k] = true; list.push({store: element.dataset.djstmStore, name: element.dataset.djstmName}); }
    });
    return list;
  }

  function show(change) {
    var k = key(change.store, change.name);
    if (versions[k] !== undefined && change.version <= versions[k]) { return; }
    versions[k] = change.version;
    var text = typeof change.value === "string" ? change.value : JSON.stringify(change.value);
    bound().forEach(function (element) {
      if (element.dataset.djstmStore === change.store && element.dataset.djstmName === change.name) {
        element.textContent = text;
        element.dispatchEvent(new CustomEvent("djstm:change", {detail: change, bubbles: true}));
      }
    });
    document.dispatchEvent(new CustomEvent("djstm:change", {detail: change}));
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + path);
    socket.onopen = function () {
      delay = 500;
      socket.send(JSON.stringify({subscribe: subscriptions(), versions: versions}));
    };
    socket.onmessage = function (message) {
      var data = JSON.parse(message.data);
      if (data.error) {
        document.dispatchEvent(new CustomEvent("djstm:error", {detail: data}));
        if (window.console) { console.warn("djstm:", data.error); }
        return;
      }
      show(data);
    };
    socket.onclose = function () {
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 30000);
    };
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", connect);
  } else {
    connect();
  }
})();
