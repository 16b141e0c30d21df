// The tutor page: a conversation streamed from /v1/chat/completions (the OpenAI API, nothing
// else generates text), kept in localStorage. Markdown via marked, sanitised by DOMPurify before
// it touches the DOM, math by KaTeX: model output can never inject HTML or script.
(() => {
  'use strict';
  const STORE = 'vidya.tutor.v1';
  const MAX_MESSAGES = 20;  // history sent with a question, before any context-length trimming
  const T = {
    hi: {
      title: 'विद्या — अध्ययन सहायक', subject: 'विषय', class: 'कक्षा', newChat: 'नई बातचीत',
      send: 'भेजें', stop: 'रोकें', placeholder: 'अपना सवाल लिखें… (Enter से भेजें)',
      welcome: 'नमस्ते! अपना सवाल हिंदी, English या Hinglish में पूछिए। शुरुआत के लिए कोई उदाहरण चुनें:',
      busy: 'सर्वर अभी बहुत व्यस्त है। कुछ सेकंड बाद फिर से भेजें।',
      down: 'सर्वर से संपर्क नहीं हो पा रहा है। थोड़ी देर बाद फिर कोशिश करें।',
      cut: 'उत्तर लंबाई की सीमा पर कट गया। बाकी जानने के लिए "आगे बताइए" लिखें।',
      stopped: 'आपने उत्तर रोक दिया।', error: 'कुछ गड़बड़ हो गई। कृपया फिर से कोशिश करें।',
      tooLong: 'यह सवाल बहुत लंबा है। कृपया छोटा करके पूछें।',
      codeAsk: 'कक्षा कोड डालें (यह आपके शिक्षक से मिलेगा):', ok: 'ठीक है',
      codeWrong: 'कक्षा कोड सही नहीं है। शिक्षक से सही कोड लें।', other: 'English',
    },
    en: {
      title: 'Vidya — study tutor', subject: 'Subject', class: 'Class', newChat: 'New chat',
      send: 'Send', stop: 'Stop', placeholder: 'Type your question… (Enter to send)',
      welcome: 'Hello! Ask your question in Hindi, English or Hinglish. Or start from an example:',
      busy: 'The server is very busy right now. Please send again in a few seconds.',
      down: 'Cannot reach the server. Please try again in a little while.',
      cut: 'The answer was cut at the length limit. Type "continue" for the rest.',
      stopped: 'You stopped the answer.', error: 'Something went wrong. Please try again.',
      tooLong: 'This question is too long. Please shorten it.',
      codeAsk: 'Enter the class code (your teacher has it):', ok: 'OK',
      codeWrong: 'The class code is not right. Ask your teacher for it.', other: 'हिंदी',
    },
  };
  const $ = (id) => document.getElementById(id);
  const state = Object.assign({lang: 'hi', subject: 'science', klass: '8', messages: [], key: ''}, read());
  let config = {subjects: {}, classes: [], examples: {hi: [], en: []}, model: undefined};
  const prompts = {};
  let controller = null;

  function read() { try { return JSON.parse(localStorage.getItem(STORE)) || {}; } catch { return {}; } }
  function save() { localStorage.setItem(STORE, JSON.stringify(state)); }
  const t = (key) => T[state.lang][key];

  // ---- history sent to the model ---------------------------------------------------------
  // The last `max` messages, starting at a user message (a turn is never cut in half).
  function trimHistory(messages, max = MAX_MESSAGES) {
    let out = messages.slice(-max);
    while (out.length && out[0].role !== 'user') out = out.slice(1);
    return out;
  }
  // After a 400 context_length_exceeded: drop the oldest turn; null when only the question is left.
  function dropOldestTurn(messages) {
    if (messages.length <= 1) return null;
    let out = messages.slice(1);
    while (out.length > 1 && out[0].role !== 'user') out = out.slice(1);
    return out;
  }

  // ---- rendering --------------------------------------------------------------------------
  function renderMarkdown(el, text) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text));
    try {
      renderMathInElement(el, {throwOnError: false, delimiters: [
        {left: '$$', right: '$$', display: true}, {left: '\\[', right: '\\]', display: true},
        {left: '$', right: '$', display: false}, {left: '\\(', right: '\\)', display: false}]});
    } catch (e) { /* half-written math while streaming: shown as text until complete */ }
  }
  function bubble(m) {
    const li = document.createElement('li');
    li.className = m.role;
    li.lang = /[\u0900-\u097F]/.test(m.content) ? 'hi' : 'en';
    if (m.role === 'user') li.textContent = m.content; else renderMarkdown(li, m.content);
    if (m.note) {
      const note = document.createElement('span');
      note.className = 'note';
      note.textContent = t(m.note);
      li.appendChild(note);
    }
    return li;
  }
  function render() {
    $('messages').replaceChildren(...state.messages.map(bubble));
    $('welcome').hidden = state.messages.length > 0;
    $('chat').scrollTop = $('chat').scrollHeight;
  }
  function applyLang() {
    document.documentElement.lang = state.lang;
    document.title = t('title');
    document.querySelectorAll('[data-i18n]').forEach((el) => { el.textContent = t(el.dataset.i18n); });
    $('input').placeholder = t('placeholder');
    $('lang').textContent = t('other');
    $('lang').lang = state.lang === 'hi' ? 'en' : 'hi';
    $('subject').replaceChildren(...Object.entries(config.subjects).map(([id, name]) => new Option(name[state.lang], id)));
    $('klass').replaceChildren(...config.classes.map((c) => new Option(c, c)));
    $('subject').value = state.subject;
    $('klass').value = state.klass;
    $('examples').replaceChildren(...(config.examples[state.lang] || []).map((q) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = q;
      b.addEventListener('click', () => send(q));
      return b;
    }));
    render();
  }
  function demoNotice() {  // in both languages whichever the interface shows: it is a warning
    const d = config.demo;
    $('demo').hidden = !d;
    if (!d) return;
    const [hi, en] = $('demo').children;
    hi.textContent = `डेमो मॉडल (${config.model}, ${d.size}): उत्तर अक्सर गलत होंगे, भरोसा न करें। ` +
      `पढ़ाई के लिए स्कूल चलाए: ${d.recommended}।`;
    en.textContent = `Demo model (${config.model}, ${d.size}): answers will often be wrong; do not rely on them. ` +
      `For study, serve: ${d.recommended}.`;
  }
  function status(text) { $('status').textContent = text || ''; }
  function busy(on) { $('send').hidden = on; $('stop').hidden = !on; }

  // ---- talking to the server ----------------------------------------------------------------
  async function systemPrompt() {
    const k = `${state.subject}/${state.klass}`;
    if (!prompts[k]) {
      const r = await fetch(`/tutor/system-prompt?subject=${encodeURIComponent(state.subject)}&klass=${encodeURIComponent(state.klass)}`);
      if (!r.ok) throw new Error(t('error'));
      prompts[k] = (await r.json()).prompt;
    }
    return prompts[k];
  }
  function askCode() {
    return new Promise((resolve) => {
      const dialog = $('code-dialog');
      $('code').value = '';
      dialog.addEventListener('close', () => { state.key = $('code').value.trim(); save(); resolve(state.key); }, {once: true});
      dialog.showModal();
    });
  }
  async function readStream(resp, reply, li) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf('\n\n')) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith('data: ')) continue;
        const data = event.slice(6);
        if (data === '[DONE]') return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(t('error'));
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          reply.content += choice.delta.content;
          renderMarkdown(li, reply.content);
          $('chat').scrollTop = $('chat').scrollHeight;
        }
        if (choice.finish_reason === 'length') reply.note = 'cut';
      }
    }
  }
  async function send(text) {
    text = text.trim();
    if (!text || controller) return;
    status('');
    state.messages.push({role: 'user', content: text});
    const reply = {role: 'assistant', content: ''};
    let history = trimHistory(state.messages);
    state.messages.push(reply);
    save();
    render();
    const li = $('messages').lastElementChild;
    controller = new AbortController();
    busy(true);
    try {
      for (;;) {
        const headers = {'Content-Type': 'application/json'};
        if (state.key) headers.Authorization = `Bearer ${state.key}`;
        const body = {model: config.model, stream: true, temperature: 0.7, max_tokens: 512,
                      messages: [{role: 'system', content: await systemPrompt()},
                                 ...history.map(({role, content}) => ({role, content}))]};
        const resp = await fetch('/v1/chat/completions', {method: 'POST', headers, body: JSON.stringify(body),
                                                          signal: controller.signal});
        if (resp.status === 400) {
          const err = (await resp.json()).error || {};
          if (err.code === 'context_length_exceeded') {
            history = dropOldestTurn(history);
            if (history) continue;
            throw new Error(t('tooLong'));
          }
          throw new Error(t('error'));
        }
        if (resp.status === 401) {
          const had = state.key;
          if (await askCode() && state.key !== had) continue;
          throw new Error(t('codeWrong'));
        }
        if (resp.status === 429) throw new Error(t('busy'));
        if (!resp.ok) throw new Error(resp.status === 503 ? t('down') : t('error'));
        await readStream(resp, reply, li);
        break;
      }
    } catch (e) {
      if (e.name === 'AbortError') reply.note = 'stopped';
      else status(e instanceof TypeError ? t('down') : e.message);
    } finally {
      if (!reply.content && !reply.note) state.messages.splice(-2, 2);  // nothing came back: let the student resend
      controller = null;
      busy(false);
      save();
      render();
      if (!reply.content && !reply.note) $('input').value = text;
    }
  }

  // ---- wiring -------------------------------------------------------------------------------
  $('ask').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('input').value;
    $('input').value = '';
    send(text);
  });
  $('input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); $('ask').requestSubmit(); }
  });
  document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && controller) controller.abort(); });
  $('stop').addEventListener('click', () => controller && controller.abort());
  $('new-chat').addEventListener('click', () => { if (controller) controller.abort(); state.messages = []; save(); render(); status(''); });
  $('lang').addEventListener('click', () => { state.lang = state.lang === 'hi' ? 'en' : 'hi'; save(); applyLang(); });
  $('subject').addEventListener('change', (e) => { state.subject = e.target.value; save(); });
  $('klass').addEventListener('change', (e) => { state.klass = e.target.value; save(); });

  window.vidyaTutor = {trimHistory, dropOldestTurn, state};
  function loadConfig() {  // again until the model has loaded: the notice needs its size
    fetch('/tutor/config').then((r) => r.json()).then((c) => {
      config = c;
      applyLang();
      demoNotice();
      if (!c.ready) setTimeout(loadConfig, 2000);
    }).catch(() => status(t('down')));
  }
  loadConfig();
  applyLang();
})();
