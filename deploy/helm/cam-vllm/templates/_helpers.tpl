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

{{/*
A pod spec running vLLM. `role`: "server" (one pod serves), or a multi-node group's "leader" (serves,
and runs the engine core) or "worker" (headless: only model workers). Multi-node pods run vLLM's own
multiprocessing across nodes (--nnodes / --node-rank / --master-addr), with tensor parallelism
spanning every GPU of the group; LeaderWorkerSet sets LWS_LEADER_ADDRESS and LWS_WORKER_INDEX.
*/}}
{{- define "cam-vllm.podSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $serves := ne .role "worker" -}}
# a Service named like vLLM injects VLLM_PORT etc., which vLLM reads as its own settings
enableServiceLinks: false
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
containers:
  - name: vllm
    image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args:
      {{- include "cam-vllm.args" $root | nindent 6 }}
      {{- if ne .role "server" }}
      - {{ printf "--tensor-parallel-size=%v" (mul $v.multiNode.nodes $v.multiNode.gpusPerNode) | quote }}
      - {{ printf "--nnodes=%v" $v.multiNode.nodes | quote }}
      - "--master-addr=$(LWS_LEADER_ADDRESS)"
      {{- if $serves }}
      - "--node-rank=0"
      {{- else }}
      - "--node-rank=$(LWS_WORKER_INDEX)"
      - "--headless"
      {{- end }}
      {{- end }}
    {{- $secret := include "cam-vllm.apiKeySecret" $root }}
    {{- if or (and $secret $serves) $v.env }}
    env:
      {{- if and $secret $serves }}
      - name: VLLM_API_KEY
        valueFrom:
          secretKeyRef:
            name: {{ $secret }}
            key: {{ $v.apiKey.secretKey }}
      {{- end }}
      {{- with $v.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- end }}
    {{- if $serves }}
    ports:
      - name: http
        containerPort: 8000
    {{- end }}
    securityContext:
      {{- toYaml $v.securityContext | nindent 6 }}
    resources:
      {{- $resources := deepCopy $v.resources }}
      {{- if ne .role "server" }}
      {{- range $part := list "requests" "limits" }}
      {{- $_ := set $resources $part (merge (dict "nvidia.com/gpu" $v.multiNode.gpusPerNode) (get $resources $part | default dict)) }}
      {{- end }}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    {{- if $serves }}
    startupProbe:
      httpGet:
        path: /health
        port: http
      periodSeconds: {{ $v.startupProbe.periodSeconds }}
      failureThreshold: {{ $v.startupProbe.failureThreshold }}
    readinessProbe:
      httpGet:
        path: /health
        port: http
      periodSeconds: 10
      failureThreshold: 3
    livenessProbe:
      httpGet:
        path: /health
        port: http
      periodSeconds: 20
      failureThreshold: 3
    {{- end }}
    volumeMounts:
      - name: shm
        mountPath: /dev/shm
      {{- if $v.modelVolume.enabled }}
      - name: model
        mountPath: {{ $v.modelVolume.mountPath }}
        readOnly: {{ $v.modelVolume.readOnly }}
      {{- end }}
volumes:
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSizeLimit }}
  {{- if $v.modelVolume.enabled }}
  - name: model
    {{- if $v.modelVolume.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $v.modelVolume.existingClaim }}
      readOnly: {{ $v.modelVolume.readOnly }}
    {{- else }}
    hostPath:
      path: {{ required "modelVolume.enabled needs modelVolume.existingClaim or modelVolume.hostPath" $v.modelVolume.hostPath }}
      type: Directory
    {{- end }}
  {{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod metadata: Prometheus scraping (where the pod serves), selector labels, the user's own. */}}
{{- define "cam-vllm.podMetadata" -}}
{{- $v := .root.Values -}}
{{- if or (ne .role "worker") $v.podAnnotations }}
annotations:
  {{- if ne .role "worker" }}
  prometheus.io/scrape: "true"
  prometheus.io/port: "8000"
  prometheus.io/path: /metrics
  {{- end }}
  {{- with $v.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
labels:
  {{- include "cam-vllm.selectorLabels" .root | nindent 2 }}
  {{- if ne .role "server" }}
  cam-vllm/role: {{ .role }}
  {{- end }}
  {{- with $v.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
