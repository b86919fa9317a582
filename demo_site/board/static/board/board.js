// Follows the board over a websocket and submits the forms without reloading.
// Everything from the server is put into the page as text, never as HTML.
(function () {
  "use strict";
  const status = document.getElementById("status");
  const errorBox = document.getElementById("error");

  function render(board) {
    document.getElementById("clicks").textContent = board.clicks;
    document.getElementById("revision").textContent = board.revision;
    const list = document.getElementById("notes");
    list.replaceChildren(...board.notes.map((note) => {
      const item = document.createElement("li");
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = note.text;
      const time = document.createElement("time");
      time.dateTime = note.posted_at;
      time.textContent = note.posted_at.slice(0, 19);
      item.append(text, " ", time);
      return item;
    }));
  }

  let delay = 250;
  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/board/`);
    socket.onopen = () => { delay = 250; status.textContent = "live"; status.classList.add("live"); };
    socket.onmessage = (event) => render(JSON.parse(event.data));
    socket.onclose = () => {
      status.textContent = "reconnecting…";
      status.classList.remove("live");
      setTimeout(connect, delay);
      delay = Math.min(delay * 2, 5000);
    };
  }
  connect();

  for (const form of document.querySelectorAll("form[data-live]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const response = await fetch(form.action, {
        method: "POST", body: new FormData(form), headers: { Accept: "application/json" },
      });
      const body = await response.json();
      errorBox.hidden = response.ok;
      if (!response.ok) { errorBox.textContent = body.error; return; }
      render(body);
      form.reset();
    });
  }
})();
