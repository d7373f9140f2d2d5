"""Bridges to outside frameworks: the LangChain and LlamaIndex plugins over one backend interface
(`ragkv_backend`: an in-process Engine or the HTTP sidecar). Import the plugin modules directly; this
package imports nothing heavy on its own."""
