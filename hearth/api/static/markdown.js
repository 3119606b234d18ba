// A small Markdown renderer for chat answers: headings, lists, block quotes, rules, fenced code blocks with simple
// highlighting, inline code, bold, italic and links. Every piece of text is HTML-escaped before it is wrapped in tags,
// so model output can never inject markup. Incomplete input (a stream cut mid-answer) renders as far as it goes.
"use strict";

const Markdown = (() => {
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // --- code highlighting: one regex pass; each token is escaped and wrapped in a span of its kind ---------------------
  const KEYWORDS = new Set((
    "and as assert async await break case catch class const continue def default del do elif else enum except export " +
    "extends false False final finally fn for from func function if impl import in interface is lambda let loop match " +
    "mod mut new nil None not null or package pass private protected pub public raise return self static struct super " +
    "switch this throw true True try type typeof use var void while with yield int float str bool char double long " +
    "string echo fi then done esac local"
  ).split(" "));
  const HASH_COMMENTS = new Set(["python", "py", "sh", "bash", "shell", "zsh", "ruby", "rb", "yaml", "yml", "toml", "r",
    "perl", "make", "makefile", "dockerfile", "ini", "conf"]);
  const SLASH_COMMENTS = /\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$)/.source;
  const HASH_COMMENT = /#[^\n]*/.source;
  const REST = [
    /"(?:\\.|[^"\\\n])*"?|'(?:\\.|[^'\\\n])*'?|`(?:\\.|[^`\\])*`?/.source,  // strings (maybe unterminated, mid-stream)
    /\b(?:0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:e[+-]?\d+)?)\b/.source,  // numbers
    /\b[A-Za-z_][A-Za-z0-9_]*\b/.source,  // words: keywords or not
  ];

  function highlight(code, lang) {
    const comments = HASH_COMMENTS.has(lang) ? HASH_COMMENT : lang ? SLASH_COMMENTS : `${SLASH_COMMENTS}|${HASH_COMMENT}`;
    const pattern = new RegExp(`(${comments})|(${REST[0]})|(${REST[1]})|(${REST[2]})`, "g");
    let out = "";
    let last = 0;
    for (const m of code.matchAll(pattern)) {
      out += escapeHtml(code.slice(last, m.index));
      const [text, comment, string, number, word] = m;
      const kind = comment ? "comment" : string ? "string" : number ? "number" : KEYWORDS.has(word) ? "keyword" : null;
      out += kind ? `<span class="tok-${kind}">${escapeHtml(text)}</span>` : escapeHtml(text);
      last = m.index + text.length;
    }
    return out + escapeHtml(code.slice(last));
  }

  // --- inline: code spans are cut out first, so nothing inside them is treated as Markdown --------------------------
  function safeUrl(url) {
    const u = url.trim();
    return /^(https?:|mailto:|\/|#|\.)/i.test(u) ? u : null;  // never javascript: or data:
  }

  function inline(text) {
    const codes = [];
    let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, ticks, code) => {
      codes.push(`<code>${escapeHtml(code.trim() || code)}</code>`);
      return `\u0000${codes.length - 1}\u0000`;
    });
    s = escapeHtml(s);
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, label, url) => {
      const href = safeUrl(url.replace(/&amp;/g, "&"));
      return href === null ? whole : `<a href="${escapeHtml(href)}" target="_blank" rel="noopener noreferrer">${label}</a>`;
    });
    s = s.replace(/\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__/g, (_, a, b) => `<strong>${a || b}</strong>`);
    s = s.replace(/\*(?=\S)([^*]*?\S)\*|\b_(?=\S)([^_]*?\S)_\b/g, (_, a, b) => `<em>${a || b}</em>`);
    s = s.replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
  }

  // --- blocks: one pass over the lines ----------------------------------------------------------------------------
  const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s{0,3}>\s?/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;

  function render(source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    const html = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = line.match(FENCE))) {
        const [, fence, lang] = m;
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) body.push(lines[i++]);
        i++;  // the closing fence (absent while the block is still streaming)
        const name = lang.toLowerCase();
        const label = name ? `<span class="code-lang">${escapeHtml(name)}</span>` : "";
        html.push(`<pre class="code">${label}<code>${highlight(body.join("\n"), name)}</code></pre>`);
      } else if ((m = line.match(HEADING))) {
        const level = m[1].length;
        html.push(`<h${level}>${inline(m[2])}</h${level}>`);
        i++;
      } else if (RULE.test(line)) {
        html.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < lines.length && QUOTE.test(lines[i])) body.push(lines[i++].replace(QUOTE, ""));
        html.push(`<blockquote>${render(body.join("\n"))}</blockquote>`);
      } else if (ITEM.test(line)) {
        i = list(lines, i, html);
      } else if (!line.trim()) {
        i++;
      } else {
        const body = [];
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) &&
               !QUOTE.test(lines[i]) && !ITEM.test(lines[i]) && !RULE.test(lines[i])) body.push(lines[i++]);
        html.push(`<p>${inline(body.join("\n")).replace(/\n/g, "<br>")}</p>`);
      }
    }
    return html.join("\n");
  }

  // A list starting at lines[i]; deeper-indented items and continuation lines nest inside the item above them.
  function list(lines, i, html) {
    const first = lines[i].match(ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const start = ordered ? parseInt(first[2], 10) : 1;
    const items = [];
    while (i < lines.length) {
      const m = lines[i].match(ITEM);
      if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
        items.push([m[3]]);
        i++;
      } else if (items.length && lines[i].trim() && (m ? m[1].length > indent : /^\s/.test(lines[i]))) {
        items[items.length - 1].push(lines[i].slice(Math.min(indent + 2, lines[i].search(/\S/))));
        i++;
      } else if (!lines[i].trim() && i + 1 < lines.length && (lines[i + 1].match(ITEM)?.[1].length ?? -1) >= indent) {
        i++;  // a blank line between items keeps the list going
      } else {
        break;
      }
    }
    const tag = ordered ? "ol" : "ul";
    const attr = ordered && start !== 1 ? ` start="${start}"` : "";
    const body = items.map(([head, ...rest]) =>
      `<li>${inline(head)}${rest.length ? render(rest.join("\n")) : ""}</li>`);
    html.push(`<${tag}${attr}>${body.join("")}</${tag}>`);
    return i;
  }

  return { render, escapeHtml, highlight };
})();
