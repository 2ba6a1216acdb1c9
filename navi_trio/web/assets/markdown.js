// A small Markdown renderer that never parses HTML.
//
// Why our own and not a library: a chat answer needs headings, paragraphs, lists, quotes,
// code (fenced and inline), emphasis and links, and nothing else. This renderer builds DOM
// nodes directly and puts every piece of model text in a text node (textContent), so HTML
// or script in an answer is shown as text and can never run: there is no sanitiser to get
// wrong and no vendored code to keep up to date. Links are kept only for http(s) and
// mailto; images are shown as links (the page fetches nothing from another host).

const SAFE_URL = /^(?:https?:|mailto:)/i;
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])\s+(.*)$/;

function el(doc, tag, cls) {
  const e = doc.createElement(tag);
  if (cls) e.className = cls;
  return e;
}

/** Render `src` as Markdown into a new DocumentFragment. */
export function renderMarkdown(src, doc = document) {
  const frag = doc.createDocumentFragment();
  blocks(doc, frag, String(src).replace(/\r\n?/g, "\n").split("\n"));
  return frag;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function blocks(doc, parent, lines) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    let m = line.match(FENCE);
    if (m) {
      const marker = m[1];
      const code = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(marker)) code.push(lines[i++]);
      i++; // the closing fence (or the end of a text still streaming)
      const pre = el(doc, "pre");
      const c = el(doc, "code");
      if (m[2]) c.dataset.lang = m[2];
      c.textContent = code.join("\n");
      pre.append(c);
      parent.append(pre);
      continue;
    }
    m = line.match(HEADING);
    if (m) {
      const h = el(doc, `h${m[1].length}`);
      inline(doc, h, m[2] || "");
      parent.append(h);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el(doc, "hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      const q = el(doc, "blockquote");
      blocks(doc, q, inner);
      parent.append(q);
      continue;
    }
    m = line.match(ITEM);
    if (m) {
      i = list(doc, parent, lines, i);
      continue;
    }
    const para = [line];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) para.push(lines[i++]);
    const p = el(doc, "p");
    inline(doc, p, para.join("\n"));
    parent.append(p);
  }
}

function list(doc, parent, lines, i) {
  const first = lines[i].match(ITEM);
  const ordered = /\d/.test(first[2]);
  const l = el(doc, ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) l.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    // Continuation: indented lines, or a lazy paragraph line right after the item.
    while (i < lines.length) {
      const next = lines[i];
      if (/^\s{2,}\S/.test(next) && !ITEM.test(next.trimStart())) body.push(next.trim());
      else if (/^\s{2,}\S/.test(next)) body.push(next.replace(/^\s{2,4}/, ""));
      else if (next.trim() && !startsBlock(next) && body.length === 1) body.push(next);
      else break;
      i++;
    }
    const li = el(doc, "li");
    if (body.some((b) => startsBlock(b))) blocks(doc, li, body);
    else inline(doc, li, body.join("\n"));
    l.append(li);
  }
  parent.append(l);
  return i;
}

const CODE_SPAN = /(`+)([\s\S]*?[^`]|[^`])\1(?!`)/y;
const LINK = /(!?)\[([^\]\n]*)\]\(\s*<?((?:[^()\s<>]|\([^()\s]*\))+)>?(?:\s+"[^"]*")?\s*\)/y;
const AUTOLINK = /https?:\/\/[^\s<>"']*[^\s<>"'.,;:!?)\]]/y;

/** Inline Markdown of `text` appended to `parent`, as text nodes and safe elements only. */
function inline(doc, parent, text) {
  let buf = "";
  const flush = () => {
    if (buf) parent.append(doc.createTextNode(buf));
    buf = "";
  };
  // Append <tag> holding the inline Markdown of `inner` (or just its text, `literal`);
  // `href` makes it a link.
  const wrap = (tag, inner, href, literal) => {
    flush();
    const e = el(doc, tag);
    if (href) {
      e.href = href;
      e.rel = "noopener noreferrer nofollow";
      e.target = "_blank";
    }
    if (literal) e.textContent = inner;
    else inline(doc, e, inner);
    parent.append(e);
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (ch === "\\" && i + 1 < text.length && /[\\`*_{}[\]()#+\-.!~>|]/.test(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
      continue;
    }
    if (ch === "`") {
      CODE_SPAN.lastIndex = i;
      const m = CODE_SPAN.exec(text);
      if (m) {
        flush();
        const c = el(doc, "code");
        c.textContent = m[2];
        parent.append(c);
        i = CODE_SPAN.lastIndex;
        continue;
      }
    }
    // Underscores inside a word (snake_case, __dunder__) are not emphasis.
    const intraword = ch === "_" && /\w/.test(text[i - 1] || "");
    if ((ch === "*" || ch === "_" || ch === "~") && text[i + 1] === ch && !intraword) {
      const end = text.indexOf(ch + ch, i + 2);
      if (end > i + 2 && !(ch === "_" && /\w/.test(text[end + 2] || ""))) {
        wrap(ch === "~" ? "del" : "strong", text.slice(i + 2, end));
        i = end + 2;
        continue;
      }
    } else if ((ch === "*" || ch === "_") && text[i + 1] && text[i + 1] !== ch && !/\s/.test(text[i + 1])) {
      const end = text.indexOf(ch, i + 1);
      if (!intraword && end > i + 1 && !/\s/.test(text[end - 1]) && !(ch === "_" && /\w/.test(text[end + 1] || ""))) {
        wrap("em", text.slice(i + 1, end));
        i = end + 1;
        continue;
      }
    }
    if (ch === "[" || (ch === "!" && text[i + 1] === "[")) {
      LINK.lastIndex = i;
      const m = LINK.exec(text);
      if (m) {
        const label = m[2] || m[3];
        if (SAFE_URL.test(m[3])) wrap("a", label, m[3]);
        else {
          flush();
          inline(doc, parent, label);
        }
        i = LINK.lastIndex;
        continue;
      }
    }
    if (ch === "h" && !/\w/.test(text[i - 1] || "")) {
      AUTOLINK.lastIndex = i;
      const m = AUTOLINK.exec(text);
      if (m) {
        wrap("a", m[0], m[0], true); // literal: a URL's underscores are not emphasis
        i = AUTOLINK.lastIndex;
        continue;
      }
    }
    if (ch === "\n") {
      flush();
      parent.append(el(doc, "br"));
      i++;
      continue;
    }
    buf += ch;
    i++;
  }
  flush();
}
