// The console's only script, and an optional one: every page works without it. It shows the
// copy buttons (hidden without JavaScript, where the text field can be selected by hand) and
// copies their field's text to the clipboard.
for (const button of document.querySelectorAll("button[data-copy]")) {
  const field = document.getElementById(button.dataset.copy);
  if (!field || !navigator.clipboard) continue;
  button.hidden = false;
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(field.value);
      button.textContent = "Copied";
    } catch {
      field.select();
      button.textContent = "Press Ctrl+C to copy";
    }
  });
}
