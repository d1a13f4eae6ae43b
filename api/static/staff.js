// The staff page: lists incidents through GET /tenants/{tenant}/incidents and runs lifecycle
// commands through POST /tenants/{tenant}/incidents/{id}/{command}, with If-Match.
"use strict";

(function () {
  const tenant = document.body.dataset.tenant;
  const form = document.getElementById("filters");
  const keyInput = document.getElementById("api-key");
  const message = document.getElementById("message");
  const body = document.querySelector("#incidents tbody");
  // The one required argument each command needs, as [field, prompt]; others take none.
  const ARGUMENTS = {
    "acknowledge": null,
    "assign": ["assignee", "Assign to"],
    "start-work": null,
    "request-information": ["question", "Question for the reporter"],
    "reporter-responded": ["response", "The reporter's answer"],
    "resolve": null,
    "reopen": ["reason", "Why reopen"],
    "close": null,
    "reject": ["reason", "Why reject"],
    "mark-duplicate": ["duplicate_of", "Duplicate of incident id"],
    "reclassify": ["category", "New category"],
    "merge-group": ["with_incident", "Merge into the group of incident id"],
    "split-group": null,
  };

  keyInput.value = sessionStorage.getItem("civicpulse-key") || "";

  function headers(extra) {
    return Object.assign({ "Authorization": "Bearer " + keyInput.value.trim() }, extra || {});
  }

  function query(format) {
    const params = new URLSearchParams();
    new FormData(form).forEach(function (value, name) {
      if (name !== "api-key" && value) { params.append(name, value); }
    });
    params.set("format", format);
    return "/tenants/" + encodeURIComponent(tenant) + "/incidents?" + params.toString();
  }

  async function problem(response) {
    try {
      const document = await response.json();
      return document.detail || document.title || response.statusText;
    } catch (error) {
      return response.statusText;
    }
  }

  function cell(row, text) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  function actions(incident) {
    const wrapper = document.createElement("div");
    const select = document.createElement("select");
    select.setAttribute("aria-label", "Command for incident " + incident.incident_id);
    Object.keys(ARGUMENTS).forEach(function (name) {
      const option = document.createElement("option");
      option.textContent = name;
      select.appendChild(option);
    });
    const run = document.createElement("button");
    run.type = "button";
    run.textContent = "Run";
    run.addEventListener("click", function () { runCommand(incident, select.value); });
    wrapper.append(select, run);
    return wrapper;
  }

  async function runCommand(incident, command) {
    const argument = ARGUMENTS[command];
    const payload = {};
    if (argument) {
      const value = window.prompt(argument[1]);
      if (!value) { return; }
      payload[argument[0]] = value;
      if (command === "reject") {
        const redirect = window.prompt("Where should the reporter go instead");
        if (!redirect) { return; }
        payload.redirect_to = redirect;
      }
    }
    const url = "/tenants/" + encodeURIComponent(tenant) + "/incidents/" +
      encodeURIComponent(incident.incident_id) + "/" + command;
    const response = await fetch(url, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json",
                         "If-Match": '"' + incident.version + '"' }),
      body: JSON.stringify(payload),
    });
    if (response.ok) {
      // The list first: it reports its own count in the same place.
      await list();
      message.textContent = command + " done for " + incident.incident_id;
    } else {
      message.textContent = command + " failed: " + await problem(response);
    }
  }

  function sla(incident) {
    if (incident.breached) { return "breached"; }
    if (incident.near_breach) { return "near breach"; }
    return incident.resolution_due_at ? "on track" : "";
  }

  async function list() {
    sessionStorage.setItem("civicpulse-key", keyInput.value.trim());
    const response = await fetch(query("json"), { headers: headers() });
    if (!response.ok) {
      message.textContent = "Listing failed: " + await problem(response);
      return;
    }
    const page = await response.json();
    body.replaceChildren();
    page.incidents.forEach(function (incident) {
      const row = document.createElement("tr");
      row.dataset.incidentId = incident.incident_id;
      cell(row, incident.incident_id);
      cell(row, incident.status);
      cell(row, incident.category);
      cell(row, incident.department);
      cell(row, incident.assignee);
      cell(row, incident.submitted_at);
      cell(row, incident.resolution_due_at);
      cell(row, sla(incident));
      cell(row, incident.group_reports > 1 ? incident.group_id : "");
      cell(row, "").appendChild(actions(incident));
      body.appendChild(row);
    });
    message.textContent = page.incidents.length + " incidents listed.";
  }

  async function download(format) {
    const response = await fetch(query(format), { headers: headers() });
    if (!response.ok) {
      message.textContent = "Export failed: " + await problem(response);
      return;
    }
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = tenant + "-incidents." + format;
    link.click();
    URL.revokeObjectURL(link.href);
  }

  form.addEventListener("submit", function (event) { event.preventDefault(); list(); });
  document.getElementById("export-csv").addEventListener("click", function () { download("csv"); });
  document.getElementById("export-jsonl").addEventListener("click", function () { download("jsonl"); });
})();
