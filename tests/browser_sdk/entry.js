// What tests/test_webrtc_browser.py uses of OpenAI's browser SDK, as one script for the page.
import { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession } from "@openai/agents-realtime";

window.OpenAIAgentsRealtime = { OpenAIRealtimeWebRTC, RealtimeAgent, RealtimeSession };
