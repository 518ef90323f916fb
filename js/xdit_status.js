// Shows the KSampler (xDiT Multi-GPU) status line on the node: the parallel plan used, or why the
// generation ran on one device. The node sends it as {"ui": {"text": [status]}}.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "xdit_multigpu.status",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "XDiTKSampler") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n") ?? "";
      let widget = this.widgets?.find((w) => w.name === "xdit_status");
      if (!widget) {
        widget = this.addWidget("text", "xdit_status", "", () => {}, { serialize: false });
        widget.disabled = true;
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
