// Compiled by tests/integration/test_generated_typescript.py against types generated from /openapi.json.
import type { components, operations, paths } from "./facegate";

type Analysis = paths["/v1/faces/analyze"]["post"]["responses"][200]["content"]["application/json"];
declare const analysis: Analysis;
const sha: string = analysis.image.sha256;
const faces: components["schemas"]["Face"][] = analysis.faces;
type Refusal = paths["/v1/usage"]["get"]["responses"][401]["content"]["application/problem+json"];
declare const refusal: Refusal;
const code: string = refusal.code;
type Usage = operations["getUsage"]["responses"][200]["content"]["application/json"];
declare const usage: Usage;
const remaining: number | null = usage.quotas.daily.remaining;
// @ts-expect-error: the document types the answer, so a field that is not there does not compile
const missing = analysis.image.nonexistent;
export const used = [sha, faces, code, remaining, missing];
