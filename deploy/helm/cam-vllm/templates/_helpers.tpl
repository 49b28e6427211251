{{- define "cam-vllm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cam-vllm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "cam-vllm.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "cam-vllm.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "cam-vllm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cam-vllm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cam-vllm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cam-vllm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding the API key, if any. */}}
{{- define "cam-vllm.apiKeySecret" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "cam-vllm.fullname" .) }}
{{- end }}
{{- end }}

{{/* `vllm serve` arguments: the model, vLLM's settings, --kv-<kebab-case key> per kvPolicy key. */}}
{{- define "cam-vllm.args" -}}
- {{ .Values.model | quote }}
{{- with .Values.servedModelName }}
- {{ printf "--served-model-name=%s" . | quote }}
{{- end }}
- {{ printf "--max-model-len=%v" .Values.maxModelLen | quote }}
- {{ printf "--gpu-memory-utilization=%v" .Values.gpuMemoryUtilization | quote }}
{{- range $key, $value := .Values.kvPolicy }}
{{- if not (kindIs "invalid" $value) }}
- {{ printf "--kv-%s=%v" (kebabcase $key) $value | quote }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}
