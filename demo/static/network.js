// The network map: every node the registry lists, read from the gateway's public GET /v1/nodes
// every few seconds, drawn on Natural Earth's countries (shipped in static/vendor, no tiles).
// Colour says the role, size the load (as the node last reported it), grey a node that is not
// live: not admitted (pending, suspended), or silent (no fresh signed load report).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 960, HEIGHT = 480;  // equirectangular: 360 x 180 degrees

function project(lon, lat) {
  return [(lon + 180) * WIDTH / 360, (90 - lat) * HEIGHT / 180];
}

function ringPath(ring, shift = 0) {
  return ring.map(([lon, lat], i) => (i ? "L" : "M") + project(lon + shift, lat).map(
    (v) => v.toFixed(1)).join(",")).join("") + "Z";
}

// A ring that crosses the antimeridian (Russia's east, Fiji) jumps by ~360 degrees between two
// points, which a plain projection draws as a stripe across the world. Unwrapped, its longitudes
// run on past +/-180; it is drawn again one world-width over, and the map's frame clips both.
function unwrap(ring) {
  let offset = 0;
  return ring.map(([lon, lat], i) => {
    const step = i ? lon - ring[i - 1][0] : 0;
    if (step > 180) offset -= 360;
    else if (step < -180) offset += 360;
    return [lon + offset, lat];
  });
}

function ringPaths(ring) {
  const unwrapped = unwrap(ring);
  const lons = unwrapped.map(([lon]) => lon);
  let d = ringPath(unwrapped);
  if (Math.max(...lons) > 180) d += ringPath(unwrapped, -360);
  if (Math.min(...lons) < -180) d += ringPath(unwrapped, 360);
  return d;
}

function geometryPath(geometry) {
  const polygons = geometry.type === "Polygon" ? [geometry.coordinates]
    : geometry.type === "MultiPolygon" ? geometry.coordinates : [];
  return polygons.map((rings) => rings.map(ringPaths).join("")).join("");
}

async function drawLand() {
  const response = await fetch("/static/vendor/countries-110m.json");
  if (!response.ok) throw new Error(`the world map did not load (${response.status})`);
  const world = await response.json();
  const land = document.getElementById("land");
  for (const country of topojson.feature(world, world.objects.countries).features) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", geometryPath(country.geometry));
    land.appendChild(path);
  }
}

function greyed(node) {
  return !node.live;
}

function statusText(node) {
  if (node.status !== "active") return node.status;
  return node.live ? "live" : (node.reason || "silent");
}

function reportAge(node) {
  return node.report_age_seconds === null ? "never" : `${node.report_age_seconds}s ago`;
}

function radius(node) {
  const ratio = node.capacity > 0 ? Math.min(1, node.load / node.capacity) : 0;
  return 5 + 13 * Math.sqrt(ratio);
}

function drawNodes(nodes) {
  const layer = document.getElementById("nodes");
  layer.replaceChildren();
  // big circles first, so a small one on the same spot stays visible
  for (const node of [...nodes].sort((a, b) => radius(b) - radius(a))) {
    const [x, y] = project(node.lon, node.lat);
    const circle = document.createElementNS(SVG, "circle");
    circle.setAttribute("cx", x.toFixed(1));
    circle.setAttribute("cy", y.toFixed(1));
    circle.setAttribute("r", radius(node).toFixed(1));
    circle.setAttribute("class", `node role-${node.role}` + (greyed(node) ? " greyed" : ""));
    for (const [name, value] of Object.entries({key: node.key, role: node.role,
        status: node.status, live: node.live, load: node.load, capacity: node.capacity})) {
      circle.dataset[name] = String(value);
    }
    const title = document.createElementNS(SVG, "title");
    title.textContent = `${node.role.toUpperCase()} ${node.url} (${node.country}): ` +
      `load ${node.load}/${node.capacity}, ${statusText(node)}, ` +
      `load report ${reportAge(node)}`;
    circle.appendChild(title);
    layer.appendChild(circle);
  }
}

function drawTable(nodes) {
  const rows = nodes.map((node) => {
    const row = document.createElement("tr");
    row.dataset.key = node.key;
    if (greyed(node)) row.className = "greyed";
    for (const text of [node.role.toUpperCase(), node.url, node.country,
        `${node.load}/${node.capacity}`, statusText(node), reportAge(node)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    return row;
  });
  document.querySelector("#node-table tbody").replaceChildren(...rows);
}

function showStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function refresh(gatewayUrl) {
  try {
    const response = await fetch(`${gatewayUrl}/v1/nodes`, {cache: "no-store"});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `status ${response.status}`);
    if (!Array.isArray(body.nodes)) throw new Error("the answer has no node list");
    drawNodes(body.nodes);
    drawTable(body.nodes);
    const routable = body.nodes.filter((n) => n.routable).length;
    showStatus(`${body.nodes.length} nodes, ${routable} taking sessions · updated ` +
      new Date().toLocaleTimeString());
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (error) {
    // keep the last picture on the map; say why it is not current
    showStatus(`could not read ${gatewayUrl}/v1/nodes: ${error.message}`, true);
    console.warn("node list refresh failed", error);
  }
}

async function start() {
  const config = await (await fetch("/api/config")).json();
  try {
    await drawLand();
  } catch (error) {
    showStatus(error.message, true);
  }
  await refresh(config.gateway_url);
  setInterval(() => refresh(config.gateway_url), config.refresh_seconds * 1000);
}

start();
